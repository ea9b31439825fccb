"""Knowledge bases in ExplicitLM's format, and their multiple-choice questions (OMCQ).

Two sources: a synthetic base of invented entities (facts no pretrained model can know; the
default, needs no download) and T-REx triples with LPAQA templates (``--trex DIR``).
"""

from __future__ import annotations

import json
import random
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from memcli.errors import MemcliError
from memcli.records import require_dir

LETTERS = "ABCDE"

# Invented-word syllables: names built from them are not real entities.
_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "r", "s", "sk", "t", "th", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "io", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "x", "m"]


@dataclass(frozen=True)
class Relation:
    pid: str
    template: str  # with [X] and [Y]
    question: str  # with [X]
    kind: str  # noun used when inventing objects


# Relations of the synthetic base; each has its own pool of invented objects.
SYNTHETIC_RELATIONS = [
    Relation("S1", "[X] was born in [Y] .", "Where was [X] born?", "city"),
    Relation("S2", "[X] works as a [Y] .", "What does [X] work as?", "job"),
    Relation("S3", "The pet of [X] is a [Y] .", "What kind of pet does [X] have?", "animal"),
    Relation("S4", "[X] plays the [Y] .", "Which instrument does [X] play?", "instrument"),
    Relation("S5", "The favourite food of [X] is [Y] .", "What is the favourite food of [X]?", "food"),
    Relation("S6", "[X] is a citizen of [Y] .", "Which country is [X] a citizen of?", "country"),
    Relation("S7", "[X] speaks [Y] .", "Which language does [X] speak?", "language"),
    Relation("S8", "[X] supports the club [Y] .", "Which club does [X] support?", "club"),
]


def invent_word(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    n = rng.randint(*syllables)
    w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)
    return w.capitalize()


def _unique_words(rng: random.Random, n: int, taken: set[str], syllables=(2, 3)) -> list[str]:
    out = []
    while len(out) < n:
        w = invent_word(rng, syllables)
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def _uuid(rng: random.Random) -> str:
    return str(uuidlib.UUID(int=rng.getrandbits(128), version=4))


@dataclass
class Fact:
    uuid: str
    subject: str
    predicate: str
    object: str
    sentence: str
    question: str

    def entry(self) -> dict:
        return {
            "sentence": self.sentence,
            "uuid": self.uuid,
            "subject": self.subject,
            "predicate": self.predicate,
            "object": self.object,
        }


def fill(template: str, x: str, y: str | None = None) -> str:
    s = template.replace("[X]", x)
    return s.replace("[Y]", y) if y is not None else s


def synthetic_facts(num_facts: int, seed: int, objects_per_relation: int = 24) -> tuple[list[Fact], dict[str, list[str]]]:
    """``num_facts`` invented facts, one per (subject, relation), balanced over relations."""
    if num_facts < 1:
        raise MemcliError(f"--num-facts got {num_facts}, expected a positive integer")
    rng = random.Random(seed)
    taken: set[str] = set()
    pools = {r.pid: _unique_words(rng, objects_per_relation, taken, (2, 2)) for r in SYNTHETIC_RELATIONS}
    n_subjects = max(1, (num_facts + 1) // 2)  # each subject has about two facts
    subjects = _unique_words(rng, n_subjects, taken, (2, 3))
    pairs = [(s, r) for s in subjects for r in SYNTHETIC_RELATIONS]
    rng.shuffle(pairs)
    # balance relations: take pairs round-robin by relation
    by_rel: dict[str, list] = {r.pid: [] for r in SYNTHETIC_RELATIONS}
    for s, r in pairs:
        by_rel[r.pid].append((s, r))
    chosen = []
    while len(chosen) < num_facts:
        for r in SYNTHETIC_RELATIONS:
            if by_rel[r.pid] and len(chosen) < num_facts:
                chosen.append(by_rel[r.pid].pop())
    facts = []
    for s, r in chosen:
        o = rng.choice(pools[r.pid])
        facts.append(Fact(_uuid(rng), s, r.pid, o, fill(r.template, s, o), fill(r.question, s)))
    return facts, pools


def read_templates(trex_dir: Path) -> dict[str, str]:
    tdir = require_dir(trex_dir / "templates", "T-REx templates directory")
    out = {}
    for p in sorted(tdir.glob("P*.txt")):
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise MemcliError(f"{p}:1: empty template file, expected a template with [X] and [Y]")
        if "[X]" not in lines[0] or "[Y]" not in lines[0]:
            raise MemcliError(f"{p}:1: template '{lines[0]}' lacks [X] or [Y]")
        out[p.stem] = lines[0]
    if not out:
        raise MemcliError(f"{tdir}: no P*.txt template files")
    return out


TREX_BUILTIN = Path(__file__).resolve().parent.parent / "assets" / "trex"  # the slice shipped with memcli


def trex_dir(spec: str | Path) -> Path:
    """``builtin`` (the T-REx slice shipped with memcli) or an LPAQA-layout directory."""
    return TREX_BUILTIN if str(spec) == "builtin" else Path(spec)


def usable(sub: str, obj: str) -> bool:
    """A triple whose question has one readable answer: subject and object differ and neither contains the other
    ("Arlon is the capital of Arlon ." tells nothing; "Paris FC is located in Paris" gives the answer away)."""
    a, b = sub.casefold(), obj.casefold()
    return a != b and a not in b and b not in a


def trex_facts(trex: str | Path, num_facts: int | None, seed: int, relations: list[str] | None = None):
    """Facts from LPAQA-layout T-REx: ``triples/P*.jsonl`` + ``templates/P*.txt`` -> (facts, pools, report).

    Dropped and counted in ``report``: triples whose subject and object are the same or contain each
    other, and ambiguous subjects (one label with several objects in a relation: no single answer).
    """
    trex = require_dir(trex_dir(trex), "T-REx directory")
    templates = read_templates(trex)
    tri_dir = require_dir(trex / "triples", "T-REx triples directory")
    rows_by_rel: dict[str, list[dict]] = {}
    report = {"same_or_contained": 0, "ambiguous_subject": 0}
    for p in sorted(tri_dir.glob("P*.jsonl")):
        pid = p.stem
        if relations and pid not in relations:
            continue
        if pid not in templates:
            continue
        by_subject: dict[str, list[dict]] = {}
        with open(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise MemcliError(f"{p}:{lineno}: invalid JSON, expected a T-REx triple object") from None
                if not isinstance(row, dict):
                    raise MemcliError(f"{p}:{lineno}: expected a JSON object with sub_label and obj_label")
                for k in ("sub_label", "obj_label"):
                    if not isinstance(row.get(k), str) or not row.get(k):
                        raise MemcliError(f"{p}:{lineno}: missing or empty field '{k}' (expected a string)")
                if not usable(row["sub_label"], row["obj_label"]):
                    report["same_or_contained"] += 1
                    continue
                by_subject.setdefault(row["sub_label"], []).append(row)
        rows = []
        for sub_rows in by_subject.values():  # one fact per (subject, relation), so the question has one answer
            if len({r["obj_label"] for r in sub_rows}) > 1:
                report["ambiguous_subject"] += len(sub_rows)
                continue
            rows.append(sub_rows[0])
        if rows:
            rows_by_rel[pid] = rows
    if not rows_by_rel:
        raise MemcliError(f"{tri_dir}: no triples found for the chosen relations")
    rng = random.Random(seed)
    all_rows = [(pid, r) for pid, rows in rows_by_rel.items() for r in rows]
    rng.shuffle(all_rows)
    if num_facts is not None:
        all_rows = all_rows[:num_facts]
    pools = {pid: sorted({r["obj_label"] for r in rows}) for pid, rows in rows_by_rel.items()}
    facts = []
    for pid, r in all_rows:
        tmpl = templates[pid]
        sent = fill(tmpl, r["sub_label"], r["obj_label"])
        q = "Fill in the blank: " + fill(tmpl, r["sub_label"], "___")
        facts.append(Fact(_uuid(rng), r["sub_label"], pid, r["obj_label"], sent, q))
    return facts, pools, report


def make_question(fact: Fact, pool: list[str], rng: random.Random, answer_slot: int) -> dict | None:
    """Five options with distractors from the same relation; the answer sits at ``answer_slot``."""
    distractors = [o for o in pool if o != fact.object]
    if len(distractors) < 4:
        return None
    opts = rng.sample(distractors, 4)
    opts.insert(answer_slot, fact.object)
    options = ",".join(f"{LETTERS[i]}:{o}" for i, o in enumerate(opts))
    return {
        "question": fact.question,
        "options": options,
        "correct_answer": f"{LETTERS[answer_slot]}:{fact.object}",
        "uuid": fact.uuid,
    }


def parse_options(options: str) -> list[tuple[str, str]]:
    """``"A:x,B:y"`` -> [("A", "x"), ("B", "y")]; tolerant of commas inside option text."""
    out: list[tuple[str, str]] = []
    parts = options.split(",")
    for part in parts:
        if len(part) >= 2 and part[0] in LETTERS and part[1] == ":" and (not out or part[0] == LETTERS[len(out)]):
            out.append((part[0], part[2:]))
        elif out:
            out[-1] = (out[-1][0], out[-1][1] + "," + part)
        else:
            raise MemcliError(f"options '{options[:60]}': expected 'A:x,B:y,...'")
    return out


def build_knowledge(facts: list[Fact], pools: dict[str, list[str]], seed: int, heldout_fraction: float):
    """Knowledge base, all questions, and a split by fact: training facts vs held-out facts."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise MemcliError(f"--heldout-fraction got {heldout_fraction}, expected a value in [0, 1)")
    rng = random.Random(seed + 1)
    kb = [{"target": [f.entry()]} for f in facts]
    questions = []
    skipped = 0
    for i, f in enumerate(facts):
        q = make_question(f, pools[f.predicate], rng, answer_slot=i % 5)  # answer letters balanced
        if q is None:
            skipped += 1
            continue
        questions.append({"target": [q]})
    order = list(range(len(questions)))
    rng.shuffle(order)
    n_held = int(round(len(questions) * heldout_fraction))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return {
        "knowledge": kb,
        "omcq": questions,
        "omcq_train": [questions[i] for i in train],
        "omcq_val": [questions[i] for i in held],
        "skipped": skipped,
    }


def object_pools(kb: list[dict]) -> dict[str, list[str]]:
    """Objects per relation in a knowledge base (used for counterfactual edits)."""
    pools: dict[str, set[str]] = {}
    for item in kb:
        e = item["target"][0]
        if e.get("predicate") and e.get("object"):
            pools.setdefault(e["predicate"], set()).add(e["object"])
    return {k: sorted(v) for k, v in pools.items()}
