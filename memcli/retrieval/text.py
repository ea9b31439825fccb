"""Entries as text, scored against the text of a query: a sentence encoder's cosine (``dense``) and BM25
(``lexical``). The explicit memory keeps one over its bank's entries (beside its trained router); the dialog memory's
turn keys are built from the same scorers.

Dense keys are computed once per entry text and may be kept in a cache directory by content (an entry's key
depends on its text and the encoder alone), so a bank of tens of thousands of entries is encoded once. A rewritten
entry gets its new key at once; the BM25 index is rebuilt at the next query (bm25s's statistics are corpus-wide).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from memcli.retrieval.lexical import BM25Index, words

CHUNK = 512  # entries per cached key file


class TextIndex:
    def __init__(self, encoder=None, lexical: bool = True, cache: Path | None = None):
        self.encoder, self.lexical, self.cache = encoder, lexical, cache
        self.texts: list[str] = []
        self.live: list[bool] = []  # False: a padding / removed entry (scored -inf)
        self.keys: torch.Tensor | None = None  # [n, d] unit vectors
        self._bm25: tuple[BM25Index, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def set(self, texts: list[str], live: list[bool] | None = None) -> None:
        """All entries at once (a bank)."""
        self.texts, self.live = list(texts), list(live if live is not None else [bool(t) for t in texts])
        self.keys = self._encode(self.texts) if self.encoder is not None else None
        self._bm25 = None

    def replace(self, rows: list[int], texts: list[str], live: list[bool] | None = None) -> None:
        """Rewrite ``rows`` (their keys recomputed; the lexical index rebuilt at the next query)."""
        live = live if live is not None else [bool(t) for t in texts]
        grow = max(rows, default=-1) + 1 - len(self.texts)
        if grow > 0:  # a grown bank: new rows start empty
            self.texts += [""] * grow
            self.live += [False] * grow
            if self.keys is not None:
                self.keys = torch.cat([self.keys, torch.zeros(grow, self.keys.shape[1])])
        for r, t, ok in zip(rows, texts, live):
            self.texts[r], self.live[r] = t, ok
        if self.keys is not None and rows:
            self.keys[torch.tensor(rows)] = self._encode(texts)
        self._bm25 = None

    def copy(self) -> "TextIndex":
        new = TextIndex(self.encoder, self.lexical, self.cache)
        new.texts, new.live = list(self.texts), list(self.live)
        new.keys = None if self.keys is None else self.keys.clone()
        return new

    def scores(self, queries: list[str], dense: bool = True, lexical: bool = True) -> dict[str, torch.Tensor]:
        """``{"dense": [Q, n], "lexical": [Q, n]}`` (those asked for and available); entries not live are -inf."""
        out = {}
        dead = torch.tensor([not x for x in self.live], dtype=torch.bool)
        if dense and self.encoder is not None and self.keys is not None:
            out["dense"] = (self.encoder.encode(queries) @ self.keys.T).masked_fill(dead, float("-inf"))
        if lexical and self.lexical:
            index, rows = self.bm25()
            part = torch.full((len(queries), len(self.texts)), float("-inf"))
            part[:, rows] = index.scores_of_tokens(words(queries))
            out["lexical"] = part
        return out

    def dense_top(self, queries: list[str], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [Q, k], rows [Q, k])``: each query's nearest live entries by the encoder's cosine, searched with
        FAISS (an exact inner-product index) where it is installed, else one matrix product."""
        q = self.encoder.encode(queries)
        live = torch.tensor(self.live, dtype=torch.bool)
        rows = live.nonzero().flatten()
        k = min(k, len(rows))
        try:
            import faiss
        except ImportError:
            faiss = None
        if faiss is not None:
            index = faiss.IndexFlatIP(self.keys.shape[1])
            index.add(self.keys[rows].contiguous().numpy())
            scores, at = index.search(q.contiguous().numpy(), k)
            return torch.from_numpy(scores), rows[torch.from_numpy(at).long()]
        scores, at = (q @ self.keys[rows].T).topk(k, dim=-1)
        return scores, rows[at]

    def bm25(self) -> tuple[BM25Index, torch.Tensor]:
        """BM25 over the live entries alone (padding would count in its corpus statistics), and their rows."""
        if self._bm25 is None:
            rows = [i for i, ok in enumerate(self.live) if ok]
            index = BM25Index()
            index.add([self.texts[i] for i in rows])
            self._bm25 = (index, torch.tensor(rows, dtype=torch.long))
        return self._bm25

    def rarest_shared(self, query: str, row: int) -> int | None:
        """``BM25Index.rarest_shared`` of a query text and an entry (by row): None when they share no word."""
        index, rows = self.bm25()
        where = (rows == row).nonzero()
        return None if not len(where) else index.rarest_shared(words([query])[0], int(where[0, 0]))

    def _encode(self, texts: list[str]) -> torch.Tensor:
        """Keys of ``texts``, read from the cache where a chunk of the same texts was encoded before."""
        if self.cache is None or len(texts) < CHUNK or getattr(self.encoder, "fingerprint", "backbone") == "backbone":
            return self.encoder.encode(texts) if texts else torch.zeros(0, 1)
        from safetensors.torch import load_file, save

        from memcli.records import atomic_write_bytes

        parts = []
        for s in range(0, len(texts), CHUNK):
            part = texts[s: s + CHUNK]
            key = hashlib.sha256((self.encoder.fingerprint + "\0" + "\0".join(part)).encode()).hexdigest()[:32]
            f = Path(self.cache) / f"{key}.safetensors"
            try:
                parts.append(load_file(str(f))["keys"])
                continue
            except Exception:  # absent or damaged: encoded again and rewritten
                pass
            k = self.encoder.encode(part)
            atomic_write_bytes(f, save({"keys": k.contiguous()}))
            parts.append(k)
        return torch.cat(parts)
