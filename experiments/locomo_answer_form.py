"""How the answer form changes a frozen backbone's LoCoMo F1: the question bare, with a short-answer instruction
after it (``memcli.hippo.turns.SHORT_ANSWER``) or inside LoCoMo's QA prompt (``memcli.eval.locomo.QA_PROMPT``),
and relative times in the turns read anchored to their dates (``anchor_relative_dates``) or not, for no
history, the evidence turns (oracle) and the retrieved top 5.
The README's design-half figures (conversations 1-5, 16 questions each of categories 1-4, seed 0):

    python experiments/locomo_answer_form.py locomo10.json --conversations 5 --encoder out/turn-encoder-6-10

About 12 minutes on 2 CPU cores for 80 questions (15 forms x setups).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from memcli.backbone import load_backbone
from memcli.eval import locomo as LC
from memcli.hippo import turns as T


FORMS = {  # the user's message: (question, instruction after it)
    "question": lambda q: (q["question"], ""),  # the bare question
    "short": lambda q: (q["question"], T.SHORT_ANSWER),  # the bare question, then "Give only the answer, ..."
    "locomo": lambda q: (LC.QA_PROMPT.format(q["question"]), ""),  # LoCoMo's own QA prompt around it
}


def questions(data, first: int, n: int, per: int, enc) -> list[tuple]:
    """(question, evidence turns, retrieved top-5 turns) for ``per`` questions of categories 1-4 per conversation."""
    out = []
    for conv in data[first: first + n]:
        entries = LC.conversation_entries(conv)
        pos = {e["id"]: i for i, e in enumerate(entries)}
        mem = T.TurnMemory(enc)
        mem.add(entries)
        picked = LC.pick_questions([q for q in conv["qa"] if q["category"] in LC.SCORED], None, per, 0)
        top = mem.search([q["question"] for q in picked], 5)[0].tolist()
        for q, t in zip(picked, top):
            ev = sorted(pos[x] for x in LC.evidence_ids(q) if x in pos)
            out.append((q, [entries[i] for i in ev], [entries[i] for i in sorted(t)]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--backbone", default="smollm2-135m")
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--conversations", type=int, default=5)
    ap.add_argument("--per-conversation", type=int, default=16)
    ap.add_argument("--encoder", default="minilm")
    a = ap.parse_args()
    bb, tok = load_backbone(a.backbone)
    bb.eval()
    qs = questions(LC.load_locomo(a.data), a.skip, a.conversations, a.per_conversation, T.make_encoder(a.encoder))
    print(f"{len(qs)} questions; token F1 per category (1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop)")
    for setup in ("none", "oracle", "turns"):
        for form in ("question", "short", "locomo"):
            for anchor in (False,) if setup == "none" else (False, True):
                def context(ev, top):
                    if setup == "none":
                        return None
                    read = ev if setup == "oracle" else top
                    return "Conversation excerpts:\n" + "\n".join(T.entry_text(e, anchor) for e in read)

                prompts = [T.context_prompt(tok, context(ev, top), *FORMS[form](q)) for q, ev, top in qs]
                answers = LC.answer_questions(LC.PlainModel(bb), tok, prompts, None, 24, 8)
                f1 = defaultdict(list)
                for (q, _, _), ans in zip(qs, answers):
                    f1[q["category"]].append(LC.score(ans, q))
                    f1["all"].append(LC.score(ans, q))
                cells = "  ".join(f"{k}: {sum(v) / len(v):.3f}" for k, v in sorted(f1.items(), key=lambda x: str(x[0])))
                print(f"{setup:6} {form:8} anchored={'on ' if anchor else 'off'}  {cells}", flush=True)


if __name__ == "__main__":
    main()
