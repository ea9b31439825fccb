"""``memcli train retriever``: fine-tune the turn memory's sentence encoder on questions and the turns they rest on.

The turn memory (memcli/hippo/turns.py) ranks turns by BM25 and by the cosine of all-MiniLM-L6-v2 embeddings.
Untrained, the dense half is the weaker one on LoCoMo (recall@5 0.36 alone): questions paraphrase what was said.
Here the encoder learns from (question, evidence turn) pairs of a LoCoMo-format file: each question is pulled
towards its evidence turn, keyed as the memory keys it (after the previous turn of its session, or alone: one
of the two drawn per step), and pushed from the batch's other positives and from ``hard_negatives`` turns of
its own conversation drawn from the ``negative_pool`` best BM25 matches that are not its evidence: a turn
memory must tell apart the turns of one conversation, which share names and topics. The loss is the in-batch
softmax of sentence-transformers' MultipleNegativesRankingLoss (cosine x ``scale``); a positive that is also
another question's positive is masked out of that question's negatives.

Only conversations ``dataset.skip`` to ``skip + conversations`` are trained on; the others are the held-out
set, whose evidence recall@k is measured before and after (the figure to report), and the output directory's
``memcli_turn_encoder.json`` names the trained conversations so ``compare locomo`` can warn when it is asked
to evaluate on them, and ``dense_share``, the weight of the dense half in the hybrid score the encoder is used
with (0.8: trained, it is the stronger half; equal weights, 0.5, suit the untrained MiniLM; both chosen by
recall on LoCoMo, each half's share measured with the encoder trained on the other half, README). The
directory is a sentence-transformers model: ``--encoder DIR`` in ``compare locomo`` and ``chat --recall`` read
it. It is written whole or not at all.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from memcli.config import Schema
from memcli.errors import MemcliError

META = "memcli_turn_encoder.json"
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # saving imports DeepSpeed, which otherwise warns on stdout


@dataclass
class RetrieverDataset:
    path: Optional[str] = None  # LoCoMo-format JSON (required): conversations with qa and evidence
    skip: int = 0  # train on conversations skip .. skip + conversations - 1 (0-based) ...
    conversations: int = 5  # ... and hold out every other one
    observations: bool = False  # also train on the conversations' `observation` statements as queries (LoCoMo has them)
    max_eval_questions: Optional[int] = None  # held-out questions per conversation for the recall figure (all)


@dataclass
class RetrieverModel:
    base: str = "minilm"  # the encoder to start from: minilm, mpnet (all-mpnet-base-v2) or a sentence-transformers directory
    max_seq_length: int = 128  # tokens per text while training (a turn after its predecessor fits; at use, the base's limit)
    dense_share: float = 0.8  # the hybrid score's dense share the trained encoder asks for (recorded; 0.5 untrained)


@dataclass
class RetrieverTraining:
    epochs: int = 4  # passes over the (question, evidence turn) pairs
    learning_rate: float = 5e-5  # AdamW; linear warmup, then linear decay to 0
    batch_size: int = 32  # questions per step; each brings its positive and its hard negatives
    hard_negatives: int = 2  # per question, drawn from ...
    negative_pool: int = 5  # ... its best BM25 turns that are not its evidence
    scale: float = 20.0  # cosine similarity x scale = the softmax's logits
    warmup_ratio: float = 0.1  # share of the steps with a linear warmup
    weight_decay: float = 0.01  # AdamW
    seed: int = 0  # shuffling, the negatives drawn, the positive's key form


@dataclass
class RetrieverLogging:
    out_dir: str = "out"  # where the encoder directory is made
    run_name: str = "turn-encoder"  # the encoder is written to out_dir/run_name
    log_interval: int = 20  # steps between console lines


@dataclass
class RetrieverRecipe(Schema):
    command = "train retriever"
    dataset: RetrieverDataset = field(default_factory=RetrieverDataset)
    model: RetrieverModel = field(default_factory=RetrieverModel)
    training: RetrieverTraining = field(default_factory=RetrieverTraining)
    logging: RetrieverLogging = field(default_factory=RetrieverLogging)

    def resolve(self):
        d, t = self.dataset, self.training
        checks = {"dataset.skip": d.skip >= 0, "dataset.conversations": d.conversations >= 1,
                  "training.epochs": t.epochs >= 1, "training.learning_rate": t.learning_rate > 0,
                  "training.batch_size": t.batch_size >= 1, "training.hard_negatives": t.hard_negatives >= 0,
                  "training.negative_pool": t.negative_pool >= max(1, t.hard_negatives),
                  "training.scale": t.scale > 0, "training.warmup_ratio": 0 <= t.warmup_ratio < 1,
                  "model.max_seq_length": self.model.max_seq_length >= 8,
                  "model.dense_share": 0 <= self.model.dense_share <= 1}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise MemcliError(f"{bad[0]}: {_value(self, bad[0])} is out of range (see --print-config for the defaults)")
        return self


def _value(cfg, dotted: str):
    sec, key = dotted.split(".")
    return getattr(getattr(cfg, sec), key)


@dataclass
class Example:
    question: str
    positives: tuple  # the evidence turn in context, alone
    negatives: list  # hard negatives (texts in context), best BM25 first


def training_examples(data: list[dict], pool: int, observations: bool = False) -> list[Example]:
    """One example per (question, evidence turn) of the given conversations; questions without evidence
    turns in the conversation are skipped. With ``observations``, also one per (observation, turn): LoCoMo's
    per-session statements about each speaker ("Caroline attended an LGBTQ support group"), each naming the
    turns it rests on, used as more queries."""
    from memcli.eval.locomo import conversation_entries, evidence_ids
    from memcli.hippo.turns import NO_PRIORS, TurnMemory, context_text, key_text

    out = []
    for conv in data:
        entries = conversation_entries(conv)
        pos = {e["id"]: i for i, e in enumerate(entries)}
        queries = [(q["question"], evidence_ids(q)) for q in conv["qa"]]
        if observations:
            queries += [(text, evidence_ids({"evidence": ev if isinstance(ev, list) else [ev]}))
                        for text, ev in observation_items(conv)]
        queries = [(q, [pos[x] for x in ev if x in pos]) for q, ev in queries]
        queries = [(q, ev) for q, ev in queries if ev]
        if not queries:
            continue
        lexical = TurnMemory(retriever="lexical", **NO_PRIORS)  # BM25 alone mines the negatives
        lexical.add(entries)
        scores = lexical.scores([q for q, _ in queries])
        ctx = [context_text(entries, i) for i in range(len(entries))]
        for j, (q, ev) in enumerate(queries):
            ranked = [i for i in torch.argsort(-scores[j], stable=True).tolist() if i not in ev][:pool]
            out += [Example(q, (ctx[i], key_text(entries[i])), [ctx[n] for n in ranked]) for i in ev]
    return out


def observation_items(conv: dict) -> list[tuple[str, object]]:
    """``(statement, evidence)`` pairs of a LoCoMo sample's ``observation`` field (absent: none), in session order."""
    obs = conv.get("observation")
    if not isinstance(obs, dict):
        return []
    out = []
    for session in obs.values():
        for items in (session.values() if isinstance(session, dict) else []):
            out += [(x[0], x[1]) for x in items if isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], str)]
    return out


def _embed(model, texts: list[str]) -> torch.Tensor:
    features = model.preprocess(texts) if hasattr(model, "preprocess") else model.tokenize(texts)  # renamed in ST 6
    return F.normalize(model(features)["sentence_embedding"], dim=-1)


def batch_loss(model, batch: list[Example], t: RetrieverTraining, rng: random.Random) -> torch.Tensor:
    """In-batch softmax: question i's logits over every positive of the batch and every hard negative."""
    positives = [rng.choice(e.positives) for e in batch]
    negatives = [n for e in batch for n in rng.sample(e.negatives, min(t.hard_negatives, len(e.negatives)))]
    docs = positives + negatives
    logits = t.scale * _embed(model, [e.question for e in batch]) @ _embed(model, docs).T
    clash = torch.tensor([[d in e.positives for d in docs] for e in batch])  # another question's copy of my positive
    clash[torch.arange(len(batch)), torch.arange(len(batch))] = False
    return F.cross_entropy(logits.masked_fill(clash, float("-inf")), torch.arange(len(batch)))


def fit(model, examples: list[Example], t: RetrieverTraining, log=None) -> list[float]:
    """Train in place; returns the loss of each step."""
    rng = random.Random(t.seed)
    torch.manual_seed(t.seed)
    steps = t.epochs * -(-len(examples) // t.batch_size)
    warm = max(1, int(t.warmup_ratio * steps))
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, (steps - s) / max(1, steps - warm)))
    losses: list[float] = []
    model.train()
    order = list(examples)
    for _ in range(t.epochs):
        rng.shuffle(order)
        for s in range(0, len(order), t.batch_size):
            loss = batch_loss(model, order[s: s + t.batch_size], t, rng)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if log is not None:
                log(len(losses), steps, losses[-1])
    model.eval()
    return losses


def train_retriever(cfg: RetrieverRecipe, log=None) -> dict:
    """Train, measure held-out recall before and after, write the encoder directory; returns the summary."""
    from memcli.eval.locomo import load_locomo, recall_only
    from memcli.retrieval.encoders import SentenceEncoder
    from memcli.records import atomic_dir, sweep_stale_temps

    d, t = cfg.dataset, cfg.training
    if not d.path:
        raise MemcliError("dataset.path: expected a LoCoMo-format JSON file (e.g. dataset.path=locomo10.json)")
    data = load_locomo(d.path)
    if d.skip + d.conversations > len(data):
        raise MemcliError(f"dataset.conversations: {d.path} has {len(data)} conversations, "
                          f"{d.skip} + {d.conversations} asked")
    trained = list(range(d.skip, d.skip + d.conversations))
    held_ids = [i for i in range(len(data)) if i not in trained]
    held = [data[i] for i in held_ids]
    examples = training_examples([data[i] for i in trained], t.negative_pool, d.observations)
    if not examples:
        raise MemcliError(f"{d.path}: no question of conversations {trained[0] + 1}-{trained[-1] + 1} has evidence turns")
    out = Path(cfg.logging.out_dir) / cfg.logging.run_name
    if out.parent.is_dir():
        sweep_stale_temps(out.parent, recursive=False)
    enc = SentenceEncoder(cfg.model.base)
    before = recall_only(held, enc, max_questions=d.max_eval_questions) if held else None
    seq = enc.model.max_seq_length
    enc.model.max_seq_length = cfg.model.max_seq_length
    t0 = time.perf_counter()
    losses = fit(enc.model, examples, t, log)
    seconds = time.perf_counter() - t0
    enc.model.max_seq_length, enc.name = seq, str(out)  # encoding at use keeps the base's limit
    enc.dense_share = cfg.model.dense_share
    after = recall_only(held, enc, max_questions=d.max_eval_questions) if held else None
    summary = {"trained_conversations": [i + 1 for i in trained], "held_out_conversations": [i + 1 for i in held_ids],
               "dense_share": cfg.model.dense_share, "examples": len(examples), "steps": len(losses),
               "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), "train_seconds": round(seconds, 1),
               "recall_before": before, "recall_after": after}
    with atomic_dir(out) as tmp:
        enc.model.save(str(tmp))
        (tmp / META).write_text(json.dumps({"data": Path(d.path).name, **summary, "config": cfg.to_dict(),
                                            "losses": [round(x, 4) for x in losses]}, indent=2), encoding="utf-8")
    return {"encoder": str(out), **summary}


def trained_conversations(encoder_dir: str | Path) -> list[int] | None:
    """The 1-based conversations a ``train retriever`` directory was trained on (None: not one of those)."""
    p = Path(encoder_dir) / META
    if not p.is_file():
        return None
    try:
        return [int(x) for x in json.loads(p.read_text(encoding="utf-8"))["trained_conversations"]]
    except (ValueError, KeyError, TypeError):
        raise MemcliError(f"{p}: expected 'trained_conversations', a list of conversation numbers") from None
