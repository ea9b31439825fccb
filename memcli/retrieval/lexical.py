"""The lexical scorer: BM25 over words (bm25s's tokenisation, Porter-stemmed, English stop words dropped), with an
index that grows one document at a time and can be rebuilt when entries are rewritten."""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections import Counter

import torch

_stemmer = None


@functools.lru_cache(maxsize=1 << 16)
def _stem(word: str) -> str:
    global _stemmer
    if _stemmer is None:
        from nltk.stem import PorterStemmer

        _stemmer = PorterStemmer()
    return _stemmer.stem(word)


def words(texts: list[str]) -> list[list[str]]:
    """bm25s's tokenisation (lower case, words of 2+ characters, English stop words dropped), Porter-stemmed."""
    import bm25s

    return bm25s.tokenize(texts, stemmer=lambda ws: [_stem(w) for w in ws], show_progress=False, return_ids=False)


_DASHES = str.maketrans({"\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-"})


def _plain(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).translate(_DASHES).casefold().split())


def names(text: str, name: str) -> bool:
    """Whether ``text`` names ``name`` whole: case, spacing and dash forms aside, not inside a longer word ("Whiting"
    does not name "Whites", "Parisian" does not name "Paris"; "Paris's" does)."""
    return bool(namer([name])(text))


def namer(candidates):
    """A function of a text: which of ``candidates`` it names (``names``). The candidates are normalised once, for
    thousands of texts checked against the subjects of an edit set."""
    plain = [(n, pn) for n in candidates if (pn := _plain(n))]

    def find(text: str) -> list[str]:
        t = _plain(text)  # the regex runs only for the candidates whose plain form the text contains
        return [n for n, pn in plain if pn in t and re.search(rf"(?<!\w){re.escape(pn)}(?!\w)", t)]

    return find


class BM25Index:
    """BM25 over documents added one at a time (Lucene idf, k1 1.2, b 0.75: bm25s's defaults, and its
    scores). bm25s indexes a fixed corpus, so a growing conversation would be re-tokenised and re-indexed at
    every query; here a document is tokenised once, when it arrives, and a query costs the postings of its
    own words."""

    def __init__(self, k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.postings: dict[str, tuple[list[int], list[int]]] = {}  # word -> (documents, counts)
        self.lengths: list[int] = []

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, docs: list[str]) -> None:
        for doc in words(docs) if docs else []:
            d = len(self.lengths)
            self.lengths.append(len(doc))
            for w, c in Counter(doc).items():
                ids, counts = self.postings.setdefault(w, ([], []))
                ids.append(d)
                counts.append(c)

    def df(self, word: str) -> int:
        """How many documents hold ``word`` (a stemmed word, as ``words`` gives it)."""
        return len(self.postings[word][0]) if word in self.postings else 0

    def rarest_shared(self, query: list[str], doc: int) -> int | None:
        """The document frequency of the rarest word ``query`` (stemmed words) shares with document ``doc``, or None
        when they share none: how specific the tie between them is (a name held by one entry, or a word of many)."""
        dfs = [len(self.postings[w][0]) for w in set(query) if w in self.postings and doc in self.postings[w][0]]
        return min(dfs) if dfs else None

    def scores(self, queries: list[str]) -> torch.Tensor:
        """``[Q, D]`` scores; a word repeated in a query counts each time (as in bm25s); 0 where nothing matches."""
        return self.scores_of_tokens(words(queries) if queries else [])

    def scores_of_tokens(self, queries: list[list[str]]) -> torch.Tensor:
        n = len(self.lengths)
        out = torch.zeros(len(queries), n, dtype=torch.float64)
        if not n or not queries:
            return out.float()
        dl = torch.tensor(self.lengths, dtype=torch.float64)
        norm = self.k1 * (1 - self.b + self.b * dl / dl.mean().clamp_min(1e-9))
        for j, words in enumerate(queries):
            for w in words:
                if w in self.postings:
                    ids, counts = self.postings[w]
                    idx, tf = torch.tensor(ids), torch.tensor(counts, dtype=torch.float64)
                    idf = math.log(1 + (n - len(ids) + 0.5) / (len(ids) + 0.5))
                    out[j].index_add_(0, idx, idf * tf / (tf + norm[idx]))
        return out.float()


