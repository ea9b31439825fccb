"""A conversation's turns as memory entries: each turn is stored with a key vector, a question brings back
its top-k turns, and they are read as a prefix of the prompt (the pretrained explicit recipe's read).

Each turn is keyed twice: alone, and in context (after the previous turn of its session, which is often
the question it answers). A query scores every turn with

- ``dense``: cosine similarity of sentence embeddings, from an encoder: ``minilm`` (the offline
  all-MiniLM-L6-v2, ``build-keys --embedder minilm``) or ``backbone`` (the mean of the backbone's states
  after one decoder layer);
- ``lexical``: BM25 (bm25s's tokenisation and scores, Porter-stemmed, English stop words dropped), indexed
  as turns arrive;
- ``hybrid`` (default): both; each score is z-normalised over the turns per query and the parts summed
  with equal weights, or with ``dense_share`` of the weight on the dense half (a ``memcli train retriever``
  encoder records the share it asks for, 0.8: trained, the dense half is the stronger one).

Three priors on top of any retriever, from what a turn is rather than what it says: ``neighbor_weight`` x the
better score of the turns just before and after it in its session (an answer is spread over a few turns, and a
question matches one of them best); ``speaker_weight`` for the turns of a speaker the question names when it
names exactly one ("What did Caroline research?" is about what Caroline said; her name is in half the turns,
so BM25 gives it little weight); ``date_weight`` for the turns dated as a question says ("on 20 January, 2023",
"on 30 November", "in July 2022", "in 2024", and in a chat "yesterday": the most precise date it names, matched
against each turn's ``date``; a turn's text never holds its own date). Found on LoCoMo conversations 1-5; the weights sit on a plateau on both halves
(README). 0 turns any of them off.

Ties keep the earlier turn. Nothing is trained. The design (two keys, equal-weight fusion) was chosen on
LoCoMo conversations 1-5 and is reported on 6-10 apart (README). Keys depend only on a turn and the one
before it, so a chat memory never re-encodes what it holds.

A memory saves to one safetensors file (keys, and the turns as JSON in its metadata) written atomically,
so a chat session reopens with the turns it had.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memcli.errors import MemcliError
from memcli.retrieval.fusion import fuse, zscore
from memcli.retrieval.lexical import BM25Index, words

RETRIEVERS = ("hybrid", "dense", "lexical")
NO_PRIORS = {"neighbor_weight": 0.0, "speaker_weight": 0.0, "date_weight": 0.0}  # TurnMemory(..., **NO_PRIORS): scores alone


def key_text(turn: dict) -> str:
    """What a turn's key encodes: who said it and what (a shared photo's caption is part of what was said)."""
    s = f"{turn['speaker']}: {turn['text']}" if turn.get("speaker") else turn["text"]
    if turn.get("caption"):
        s += f" [shares {turn['caption']}]"
    return s


def context_text(turns: list[dict], i: int) -> str:
    """Turn ``i`` after the turn before it in the same session (a turn often answers the one before)."""
    t = turns[i]
    if i > 0 and turns[i - 1].get("session") == t.get("session"):
        return key_text(turns[i - 1]) + "\n" + key_text(t)
    return key_text(t)


def entry_text(turn: dict, anchor: bool = True) -> str:
    """How a turn is written into the prompt: its date first, because questions ask when things happened.
    The date stays as the conversation gives it: written as a bare day ("8 May 2023", the form of LoCoMo's
    answers), SmolLM2's temporal F1 fell (turns 0.021 -> 0.015, oracle 0.055 -> 0.040, 80 design questions).
    With ``anchor``, relative times in the text carry the date they mean (``anchor_relative_dates``)."""
    s = key_text(dict(turn, text=anchor_relative_dates(turn["text"], turn.get("date")))) if anchor else key_text(turn)
    return f"[{turn['date']}] {s}" if turn.get("date") else s


def excerpt_prompt(tok, entries: list[dict], question: str, native: bool = False) -> list[int]:
    """Turns read from memory (conversation order, each with its date) with the question: in the user message before
    it (the HIPPO recipe's trained format), or with ``native`` as ``context_prompt`` writes them."""
    from memcli.hippo.data import prompt_ids
    from memcli.retrieval.placement import encode, place

    text = "Conversation excerpts:\n" + "\n".join(entry_text(e) for e in entries)
    if native:
        return context_prompt(tok, text, question)
    return place(tok, prompt_ids(tok, question), [encode(tok, text)], "user_before", [], sep="\n\n")


SHORT_ANSWER = "Give only the answer, as short as possible."  # LoCoMo's answers are short phrases


def context_prompt(tok, context: str | None, question: str, instruction: str = SHORT_ANSWER) -> list[int]:
    """A backbone answering alone, in its chat template's own form: the context (turns read, the history) placed in
    the system message after the template's default one (``memcli.retrieval.placement``, placement ``system``), the
    question as the user's message with ``instruction`` after it. Chosen on LoCoMo conversations 1-5: SmolLM2 given
    the context and the question in one user message, with no system message, repeated the question instead of
    answering it in 11-22% of answers; without the instruction it answers in sentences or declines ("as a chatbot,
    I don't have ..."), and the evidence turns' F1 is half (0.098 against 0.189, 80 questions; README)."""
    from memcli.retrieval.placement import chat_prompt_ids, encode, place

    ask = f"{question}\n{instruction}" if instruction else question
    return place(tok, chat_prompt_ids(tok, ask), [encode(tok, context)] if context else [], "system", [])


class LikelihoodReranker:
    """Re-orders a question's best candidate turns by how likely a language model finds the question after
    the turn, log p(question | turn) (query-likelihood re-ranking, as UPR does for passages: nothing trained).
    A turn that could have prompted the question ranks first, also when it shares no word with it."""

    def __init__(self, backbone, tok, candidates: int = 20, turn_tokens: int = 160, name: str = "lm"):
        self.backbone, self.tok, self.candidates, self.turn_tokens = backbone, tok, candidates, turn_tokens
        self.name = name

    @torch.no_grad()
    def scores(self, turns: list[str], question: str) -> torch.Tensor:
        """``[len(turns)]`` summed log-probabilities of the question's tokens after each turn."""
        tok = self.tok
        q = tok(" " + question, add_special_tokens=False)["input_ids"]
        seqs = [tok(t + "\nQuestion:", add_special_tokens=False)["input_ids"][-self.turn_tokens:] + q for t in turns]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id if tok.pad_token_id is not None else 0)
        att = torch.zeros_like(ids)
        for i, x in enumerate(seqs):  # right padding: every row's positions start at 0
            ids[i, :len(x)] = torch.tensor(x)
            att[i, :len(x)] = 1
        bb = self.backbone
        dev = next(bb.parameters()).device
        h = bb.get_decoder()(input_ids=ids.to(dev), attention_mask=att.to(dev)).last_hidden_state
        out = torch.empty(len(seqs))
        head = bb.get_output_embeddings()
        for i, x in enumerate(seqs):  # the vocabulary projection for the question's positions only
            start = len(x) - len(q)
            logp = torch.log_softmax(head(h[i, start - 1: len(x) - 1]).float(), -1)
            out[i] = logp.gather(1, torch.tensor(x[start:], device=dev)[:, None]).sum().cpu()
        return out


def neighbor_scores(s: torch.Tensor, sessions: list) -> torch.Tensor:
    """``[Q, n]``: for each turn, the larger score of the turn before and the turn after it in the same session
    (a side with no such turn counts 0, the mean of a z-fused score)."""
    ids = {x: i for i, x in enumerate(dict.fromkeys(sessions))}
    sess = torch.tensor([ids[x] for x in sessions])
    zero = torch.zeros_like(s[:, :1])
    same = (sess[1:] == sess[:-1]).unsqueeze(0)  # turns i and i + 1 share a session
    prev = torch.cat([zero, torch.where(same, s[:, :-1], 0.0)], 1)
    nxt = torch.cat([torch.where(same, s[:, 1:], 0.0), zero], 1)
    return torch.maximum(prev, nxt)


def named_speaker_mask(queries: list[str], speakers: list) -> torch.Tensor:
    """``[Q, n]`` 1 on the turns of the speaker a query names, when it names exactly one of them (by first name,
    whole word, any case: "Caroline's" names Caroline); 0 elsewhere."""
    out = torch.zeros(len(queries), len(speakers))
    names = sorted({x for x in speakers if isinstance(x, str) and x.strip()})
    if len(names) < 2:  # one speaker (or none): naming them tells no turn apart
        return out
    pattern = {x: re.compile(rf"\b{re.escape(x.split()[0])}\b", re.IGNORECASE) for x in names}
    for j, q in enumerate(queries):
        named = [x for x in names if pattern[x].search(q)]
        if len(named) == 1:
            out[j] = torch.tensor([float(x == named[0]) for x in speakers])
    return out


_FULL_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
                "November", "December")
_MONTHS = tuple(m[:3].lower() for m in _FULL_MONTHS)
_MONTH = (r"(jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|"
          r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\b\.?")
_DAY = r"(\d{1,2})(?:st|nd|rd|th)?"
_DATE_FORMS = (  # most precise first; each: the pattern, then its (year, month, day) groups (0: no year named)
    (re.compile(rf"\b{_DAY}\s+{_MONTH},?\s+(\d{{4}})\b", re.I), (3, 2, 1)),  # 20 January, 2023
    (re.compile(rf"\b{_MONTH}\s+{_DAY},?\s+(\d{{4}})\b", re.I), (3, 1, 2)),  # January 20, 2023
    (re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b"), (1, 2, 3)),  # 2023-01-20
    (re.compile(rf"\b{_DAY}\s+{_MONTH}", re.I), (0, 2, 1)),  # 30 November: that day of any year
    (re.compile(rf"\b{_MONTH}\s+{_DAY}\b", re.I), (0, 1, 2)),  # November 30th
    (re.compile(r"\b(today|yesterday)\b", re.I), None),  # relative to the day the memory is asked on
    (re.compile(rf"\b{_MONTH},?\s+(\d{{4}})\b", re.I), (2, 1)),  # July 2022
    (re.compile(r"\b((?:19|20)\d{2})\b"), (1,)),  # 2024
)


@functools.lru_cache(maxsize=1 << 14)  # a turn's date is parsed again at every query otherwise
def parse_date(text: str | None, today: datetime.date | None = None) -> tuple | None:
    """The first, most precise date in ``text`` as ``(year, month, day)``, ``(year, month)`` or ``(year,)``;
    a day named without a year ("on 30 November") has year None, which any year matches. "today" and
    "yesterday" are read only when ``today`` is given (a chat's clock; a recorded conversation has none)."""
    for pattern, order in _DATE_FORMS:
        m = pattern.search(text or "")
        if m and order is None:
            if today is None:
                continue
            day = today - datetime.timedelta(days=int(m.group(1).lower() == "yesterday"))
            return day.year, day.month, day.day
        if m:
            parts = [m.group(i) if i else None for i in order]
            if len(parts) > 1 and not parts[1].isdigit():
                parts[1] = _MONTHS.index(parts[1][:3].lower()) + 1
            return tuple(None if x is None else int(x) for x in parts)
    return None


_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "a few": None, "few": None,
           "a couple of": 2, "couple of": 2}
_RELATIVE = re.compile(r"\b(yesterday|last night|last (?:week(?:end)?|month|year)|next (?:week|month|year)|"
                       rf"last (?:{'|'.join(_WEEKDAYS)})|"
                       rf"({'|'.join(sorted(_COUNTS, key=len, reverse=True))}|\d+) (day|week|month|year)s? ago)\b", re.I)


def day_text(day: datetime.date) -> str:
    """A day as LoCoMo writes it: "8 May, 2023"."""
    return f"{day.day} {_FULL_MONTHS[day.month - 1]}, {day.year}"


def _month_shift(day: datetime.date, months: int) -> str:
    m = day.year * 12 + day.month - 1 + months
    return f"{_FULL_MONTHS[m % 12]} {m // 12}"


def _resolve(m: re.Match, day: datetime.date) -> str:
    """The absolute date a relative expression names, said on ``day``."""
    phrase = m.group(1).lower()
    if phrase in ("yesterday", "last night"):
        return day_text(day - datetime.timedelta(days=1))
    if phrase.startswith(("last", "next")):
        unit, sign = phrase.split()[1], (-1 if phrase.startswith("last") else 1)
        if unit in _WEEKDAYS:
            back = (day.weekday() - _WEEKDAYS.index(unit) - 1) % 7 + 1  # the latest such day before ``day``
            return day_text(day - datetime.timedelta(days=back))
        if unit in ("week", "weekend"):
            return f"the {unit} {'before' if sign < 0 else 'after'} {day_text(day)}"
        return _month_shift(day, sign) if unit == "month" else str(day.year + sign)
    count, unit = _COUNTS.get(m.group(2).lower(), None) if not m.group(2).isdigit() else int(m.group(2)), m.group(3).lower()
    if count is None:
        return f"a few {unit}s before {day_text(day)}"
    if unit in ("day", "week"):
        return day_text(day - datetime.timedelta(days=count * (7 if unit == "week" else 1)))
    return _month_shift(day, -count) if unit == "month" else str(day.year - count)


def anchor_relative_dates(text: str, date: str | None) -> str:
    """``text`` with each relative time it names ("yesterday", "last Friday", "two weeks ago", "next month")
    followed by the date it means, counted from the day the turn was said (``date``; nothing without a day):
    "I adopted him last Friday (5 May, 2023)". A question asks when; a small reader copies a date it is shown
    and does not count back from one."""
    when = parse_date(date) if isinstance(date, str) else None
    if when is None or len(when) < 3 or when[0] is None:
        return text
    try:
        day = datetime.date(*when)
    except ValueError:  # "31 February"
        return text
    return _RELATIVE.sub(lambda m: f"{m.group(0)} ({_resolve(m, day)})", text)


def _same_day(want: tuple, day: tuple | None) -> bool:
    """A turn's date ``day`` falls on the query's ``want`` (as precise as ``want``; a None part matches any)."""
    return day is not None and len(day) >= len(want) and all(w is None or w == d for w, d in zip(want, day))


def named_date_mask(queries: list[str], dates: list, today: datetime.date | None = None) -> torch.Tensor:
    """``[Q, n]`` 1 on the turns whose date falls on the date a query names (same day, month or year, as
    precise as the query is); 0 elsewhere and for queries that name none."""
    out = torch.zeros(len(queries), len(dates))
    days = [parse_date(d) if isinstance(d, str) else None for d in dates]
    for j, q in enumerate(queries):
        want = parse_date(q, today)
        if want is not None:
            out[j] = torch.tensor([float(_same_day(want, d)) for d in days])
    return out


@dataclass
class TurnMemory:
    """Turns (dicts with ``text`` and optionally ``id``, ``speaker``, ``date``, ``session``, ``caption``), each
    with two dense keys (alone, in context) when the retriever uses them."""

    encoder: object = None
    retriever: str = "hybrid"
    turns: list = field(default_factory=list)
    keys: torch.Tensor | None = None  # [n, 2, d]: alone, in context
    reranker: LikelihoodReranker | None = None  # re-orders each query's best candidates
    dense_share: float | None = None  # hybrid: the dense half's share of the weight (None: the encoder's; 0.5 equal)
    neighbor_weight: float = 0.5  # x the better fused score of the turns beside it in its session
    speaker_weight: float = 8.0  # added to the turns of the one speaker a question names
    date_weight: float = 8.0  # added to the turns on the date (day, month or year) a question names
    today: datetime.date | None = None  # what "today" / "yesterday" in a question mean (a chat sets it)
    _lexical: list = field(default_factory=list, repr=False)  # BM25 of the turns alone, in context

    def __post_init__(self):
        if self.retriever not in RETRIEVERS:
            raise MemcliError(f"turn retriever '{self.retriever}': expected one of {', '.join(RETRIEVERS)}")
        if self.retriever != "lexical" and self.encoder is None:
            raise MemcliError(f"turn retriever '{self.retriever}' needs an encoder")
        for key in ("neighbor_weight", "speaker_weight", "date_weight"):
            if not getattr(self, key) >= 0:
                raise MemcliError(f"turn memory {key} {getattr(self, key)}: expected a number >= 0")
        if self.dense_share is None:
            self.dense_share = getattr(self.encoder, "dense_share", 0.5)
        if not 0 <= self.dense_share <= 1:
            raise MemcliError(f"turn memory dense_share {self.dense_share}: expected a number from 0 to 1")

    @property
    def name(self) -> str:
        return self.retriever if self.retriever == "lexical" else f"{self.retriever}/{self.encoder.name}"

    def __len__(self) -> int:
        return len(self.turns)

    def add(self, turns: list[dict]) -> None:
        """Write turns (in order); only the new turns are encoded."""
        if not turns:
            return
        start = len(self.turns)
        self.turns += [dict(t) for t in turns]
        if self.retriever == "lexical":
            return
        texts = [key_text(t) for t in turns] + [context_text(self.turns, i) for i in range(start, len(self.turns))]
        v = self.encoder.encode(texts)
        new = torch.stack([v[: len(turns)], v[len(turns):]], dim=1)
        self.keys = new if self.keys is None else torch.cat([self.keys, new])

    def scores(self, queries: list[str]) -> torch.Tensor:
        """``[Q, n]`` fused scores (``memcli.retrieval.fusion.fuse`` of the dense and BM25 scores of both keys), with
        the priors."""
        # each key's part weighs 1 alone; the hybrid gives its dense half 2 * share and its lexical half 2 * (1 - share)
        dense_w, lexical_w = {"hybrid": (2 * self.dense_share, 2 * (1 - self.dense_share)), "dense": (1.0, 0.0),
                              "lexical": (0.0, 1.0)}[self.retriever]
        parts = []
        if dense_w:
            q = self.encoder.encode(queries)
            parts += [(q @ self.keys[:, 0].T, dense_w), (q @ self.keys[:, 1].T, dense_w)]
        if lexical_w:
            toks = words(queries)
            parts += [(index.scores_of_tokens(toks), lexical_w) for index in self._lexical_indexes()]
        fused = fuse(parts)
        if self.neighbor_weight:
            fused = fused + self.neighbor_weight * neighbor_scores(fused, [t.get("session") for t in self.turns])
        if self.speaker_weight:
            fused = fused + self.speaker_weight * named_speaker_mask(queries, [t.get("speaker") for t in self.turns])
        if self.date_weight:
            dates = [t.get("date") for t in self.turns]
            fused = fused + self.date_weight * named_date_mask(queries, dates, self.today)
        return fused

    def _lexical_indexes(self) -> list[BM25Index]:
        """The two BM25 indexes, brought up to date with the turns (only turns not indexed yet are tokenised)."""
        if not self._lexical or len(self._lexical[0]) > len(self.turns):
            self._lexical = [BM25Index(), BM25Index()]
        start = len(self._lexical[0])
        if start < len(self.turns):
            self._lexical[0].add([key_text(t) for t in self.turns[start:]])
            self._lexical[1].add([context_text(self.turns, i) for i in range(start, len(self.turns))])
        return self._lexical

    def search(self, queries: list[str], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [Q, k'], scores [Q, k'])`` of each query's best turns, best first; k' = min(k, turns)."""
        k = min(k, len(self.turns))
        if k == 0 or not queries:
            return torch.zeros(len(queries), 0, dtype=torch.long), torch.zeros(len(queries), 0)
        sim = self.scores(queries)
        order = torch.argsort(-sim, dim=1, stable=True)  # stable: ties keep the earlier turn
        if self.reranker is None:
            order = order[:, :k]
            return order, sim.gather(1, order)
        n = min(max(k, self.reranker.candidates), len(self.turns))
        order, first = order[:, :n], sim.gather(1, order[:, :n])
        rows, scores = [], []
        for j, q in enumerate(queries):
            lm = self.reranker.scores([key_text(self.turns[i]) for i in order[j].tolist()], q)
            fused = zscore(lm[None])[0] + zscore(first[j][None])[0]  # the retriever's evidence is kept beside the LM's
            best = torch.argsort(-fused, stable=True)[:k]
            rows.append(order[j][best])
            scores.append(fused[best])
        return torch.stack(rows), torch.stack(scores)

    def read(self, query: str, k: int) -> list[dict]:
        """The query's top-k turns, in conversation order (how they are written into the prompt), with scores."""
        idx, sc = self.search([query], k)
        hits = sorted(zip(idx[0].tolist(), sc[0].tolist()))
        return [dict(self.turns[i], row=i, score=round(s, 4)) for i, s in hits]

    # ---- persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.keys is None else {"turn_keys": self.keys}

    @property
    def keyed_by(self) -> str:
        """The retriever and the encoder's fingerprint: a session's keys are only read back by the same pair."""
        return self.retriever if self.retriever == "lexical" else f"{self.retriever}/{self.encoder.fingerprint}"

    def metadata(self) -> dict[str, str]:
        return {"turns": json.dumps(self.turns, ensure_ascii=False), "turn_retriever": self.name,
                "turn_keys_by": self.keyed_by}

    def load_from(self, tensors: dict, meta: dict, where: str) -> None:
        # files written before turn_keys_by was recorded name the encoder as it was given
        same = meta["turn_keys_by"] == self.keyed_by if "turn_keys_by" in meta else meta.get("turn_retriever") == self.name
        if not same:
            raise MemcliError(f"{where}: its turns were keyed for retriever '{meta.get('turn_retriever')}' "
                              f"({meta.get('turn_keys_by', 'no fingerprint')}), this session uses '{self.name}' "
                              f"({self.keyed_by})")
        try:
            turns = json.loads(meta.get("turns", "[]"))
        except json.JSONDecodeError as e:
            raise MemcliError(f"{where}: the turns metadata is not JSON ({e.msg})") from None
        keys = tensors.get("turn_keys")
        if not isinstance(turns, list) or (self.retriever != "lexical" and
                                           (0 if keys is None else keys.shape[0]) != len(turns)):
            raise MemcliError(f"{where}: {0 if keys is None else keys.shape[0]} turn keys for "
                              f"{len(turns) if isinstance(turns, list) else '?'} turns")
        self.turns, self.keys, self._lexical = turns, (None if keys is None else keys.float()), []


def save_session(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """One safetensors file, written aside and renamed: a session file is whole or absent."""
    from safetensors.torch import save

    from memcli.records import atomic_write_bytes

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    atomic_write_bytes(path, data)


def load_session(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise MemcliError(f"{p}: not a memcli chat session file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:80] if str(e) else 'unreadable'})") from None
