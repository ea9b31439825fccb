"""The ways a fact can be asked: its entry's own words, paraphrase templates, a natural question.

A relation's LPAQA templates (``templates/P*.txt``: the canonical first, then paraphrases ranked by
LPAQA) are split once, by a fixed rule, into templates a recipe may train on and templates kept for
evaluation only: the distinct usable paraphrases (subject before the object, some words between them,
not the canonical one again up to case and punctuation), at most ``MAX_PARAPHRASES`` of them, alternate
held-out (first, third, ...) and training (second, fourth, ...). So the best-ranked paraphrase is
always held out. ``questions.tsv`` holds one natural question per relation (``Where was [X] born?``), which the
pretrained recipe trains on; ``questions_heldout.tsv`` two more per relation in other words (``What is the
birthplace of [X]?``), for evaluation only.
The synthetic relations of the default data have their canonical template and question only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from memcli.data.knowledge import SYNTHETIC_RELATIONS, TREX_BUILTIN, trex_dir
from memcli.errors import MemcliError

MAX_PARAPHRASES = 8
HELDOUT_QUESTIONS = "questions_heldout.tsv"  # two more natural questions per relation, for evaluation only


@dataclass(frozen=True)
class Forms:
    canonical: str
    train: tuple[str, ...] = ()
    heldout: tuple[str, ...] = ()
    question: str | None = None
    # natural questions kept for evaluation only (questions_heldout.tsv): other wordings than the trained one
    heldout_questions: tuple[str, ...] = ()


def _key(template: str) -> str:
    return re.sub(r"[^a-z\[\]]", "", template.lower())


def cloze_prefix(template: str, subject: str) -> str | None:
    """``template`` filled with ``subject`` and cut before its object; None when it does not ask for the object
    after the subject with words between them."""
    x, y = template.find("[X]"), template.find("[Y]")
    if x < 0 or y <= x or not template[x + 3: y].strip():
        return None
    return template[:y].replace("[X]", subject).rstrip()


def split_templates(lines: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training, held-out) paraphrases of a relation whose canonical template is ``lines[0]``."""
    seen = {_key(lines[0])}
    usable = []
    for t in lines[1:]:
        if _key(t) in seen or cloze_prefix(t, "X") is None:
            continue
        seen.add(_key(t))
        usable.append(t)
        if len(usable) == MAX_PARAPHRASES:
            break
    return tuple(usable[1::2]), tuple(usable[0::2])


def read_questions(path: Path) -> dict[str, tuple[str, ...]]:
    """``relation -> questions`` of a TSV whose lines are ``relation<TAB>question[<TAB>question ...]``."""
    out = {}
    if not path.is_file():
        return out
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        pid, *qs = line.split("\t")
        if not qs or any("[X]" not in q for q in qs):
            raise MemcliError(f"{path}:{n}: expected 'relation<TAB>question with [X]', got '{line[:60]}'")
        out[pid.strip()] = tuple(q.strip() for q in qs)
    return out


def load_forms(trex: str | Path = "builtin") -> dict[str, Forms]:
    """Forms of every relation with templates under ``trex`` (an LPAQA-layout directory or ``builtin``), plus the
    synthetic relations. Questions come from ``trex``'s ``questions.tsv``, else from memcli's."""
    d = trex_dir(trex)
    out = {r.pid: Forms(r.template, question=r.question) for r in SYNTHETIC_RELATIONS}
    questions = read_questions(d / "questions.tsv") or read_questions(TREX_BUILTIN / "questions.tsv")
    others = read_questions(d / HELDOUT_QUESTIONS) or read_questions(TREX_BUILTIN / HELDOUT_QUESTIONS)
    for p in sorted((d / "templates").glob("P*.txt")):
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            continue
        train, held = split_templates(lines)
        out[p.stem] = Forms(lines[0], train, held, questions.get(p.stem, (None,))[0], others.get(p.stem, ()))
    return out
