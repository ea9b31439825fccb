"""Chat with a trained checkpoint: HF ``generate`` with the KV cache, streamed, with conversation history."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memcli.errors import MemcliError
from memcli.kinds import KINDS

METHOD_TYPES = ("lora", "full")  # open a run of any kind whose backbone was trained so
MODEL_TYPES = (*(k.chat_type for k in KINDS.values()), *METHOD_TYPES)
HELP = "/exit (or exit, quit) · /reset clear the history · /memory entries read for the last answer · /help this text"
HIPPO_HELP = ("/exit (or exit, quit) · /reset_hidden (or reset_hidden) clear the memory state and kept turns · /state its norm and turn count · "
              "/memory turns read for the last answer · "
              "/help this text")


def said(when: datetime.datetime) -> str:
    """A turn's date as LoCoMo writes it ("1:56 pm on 8 May, 2023"), English whatever the locale, so
    ``memcli.hippo.turns.parse_date`` reads it back."""
    from memcli.hippo.turns import day_text

    return f"{when.hour % 12 or 12}:{when.minute:02d} {'am' if when.hour < 12 else 'pm'} on {day_text(when.date())}"


@dataclass
class GenOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise MemcliError(f"--max-new-tokens got {self.max_new_tokens}, expected a positive integer")
        if self.temperature < 0:
            raise MemcliError(f"--temperature got {self.temperature}, expected >= 0")
        if not 0 < self.top_p <= 1:
            raise MemcliError(f"--top-p got {self.top_p}, expected a value in (0, 1]")
        if self.repetition_penalty <= 0:
            raise MemcliError(f"--repetition-penalty got {self.repetition_penalty}, expected > 0")

    def generate_kwargs(self, tok) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  repetition_penalty=self.repetition_penalty, use_cache=True)
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kw.update(do_sample=False)
        return kw


@dataclass
class ChatSession:
    model: object
    tok: object
    bank: object
    options: GenOptions
    history: list = field(default_factory=list)
    last_memory: list = field(default_factory=list)
    # a run trained in the cloze format (the pretrained recipe) completes the text as typed (no template, no
    # history), and answers a question (text ending in '?') alone in the chat template, as dataset.paraphrases trains
    plain: bool = False

    @torch.no_grad()
    def reply(self, text: str, streamer=None) -> str:
        self.history.append({"role": "user", "content": text})
        if self.plain and not text.rstrip().endswith("?"):
            ids = torch.tensor([self.tok(text, add_special_tokens=False)["input_ids"]])
            att = torch.ones_like(ids)
        else:
            turns = self.history[-1:] if self.plain else self.history
            enc = self.tok.apply_chat_template(turns, tokenize=True, add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
            ids, att = enc["input_ids"], enc["attention_mask"]
        records: list[dict] = []
        out = self.model.generate(input_ids=ids, attention_mask=att, streamer=streamer, records=records,
                                  **self.options.generate_kwargs(self.tok))
        new = out[0, ids.shape[1]:]
        answer = self.tok.decode(new, skip_special_tokens=True).strip()
        self.history.append({"role": "assistant", "content": answer})
        self.last_memory = self._memory_read(records)
        return answer

    def _memory_read(self, records: list[dict], top: int = 5) -> list[dict]:
        """Entries that carried the most weight over the answer's positions (first memory layer)."""
        recs = [r for r in records if r["layer"] == self.model.cfg.memory_layers[0]]
        if not recs or ("read_rows" in recs[0] and bool((recs[0]["read_rows"] < 0).all())):
            return []  # retrieval abstained: no entry was read
        N = self.model.cfg.knowledge_num
        total = torch.zeros(N)
        for r in recs[1:] or recs:  # records after the first cover the generated tokens (KV cache)
            total.index_add_(0, r["cells"].reshape(-1).cpu(), r["weights"].reshape(-1).float().cpu())
        v, rows = total.topk(min(top, N))
        texts = self.bank.decode(self.tok, rows.tolist())
        s = float(total.sum()) or 1.0
        return [{"row": int(r), "share": round(float(x) / s, 4), "text": t} for r, x, t in zip(rows, v, texts)]

    def reset(self) -> None:
        self.history.clear()
        self.last_memory = []

    help = HELP

    def json_extra(self) -> dict:
        return {"memory": self.last_memory}

    def command(self, text: str):
        """A slash command -> a line to print, or ``(title, columns, rows)`` for a table; None: not this session's."""
        if text == "/reset":
            self.reset()
            return "history cleared"
        if text == "/memory":
            if not self.history:
                return "no answer yet"
            if not self.last_memory:
                return ("none: no entry was read for the last answer (retrieval abstained: no candidate's subject is "
                        "named in it, or none shares a rare word with it, model.anchor / model.anchor_df; or the best "
                        "scored below model.abstain_below)")
            return ("memory read for the last answer", ["row", "share", "entry"],
                    [(m["row"], m["share"], m["text"]) for m in self.last_memory])
        return None


@dataclass
class HippoChatSession:
    """The prompt holds only the current message; earlier turns live in the HIPPO state (constant cost per turn).

    Each user message is answered from the state of the turns before it; then the message and the answer
    are written into the state as two turns (the query never sees its own turn in memory). With ``recall``
    > 0 the turns are also kept as retrievable entries (``memcli.hippo.turns``) and the message's top
    ``recall`` turns are read before it; ``session_path`` saves the state and the turns after every
    answer (one safetensors file, atomic) and reopens them. Each kept turn records when it was said (in
    LoCoMo's form, "1:56 pm on 8 May, 2023") and which opening of the session file it belongs to, so the turn
    memory's date and neighbour priors work in chat as on a recorded conversation ("what did I say yesterday?").
    """

    model: object
    tok: object
    options: GenOptions
    max_turn_length: int = 64
    recall: int = 0
    session_path: Path | None = None
    encoder: str = "minilm"  # the turn memory's dense keys: minilm or a 'train retriever' directory
    clock: Callable[[], datetime.datetime] = datetime.datetime.now  # when a turn is said (tests set it)
    state: torch.Tensor | None = None
    turns: int = 0
    sitting: int = 0  # this opening of the session file: the turns' ``session`` (neighbours stay within one)
    memory: object = None
    last_read: list = field(default_factory=list)

    def __post_init__(self):
        from memcli.hippo.turns import TurnMemory
        from memcli.retrieval.encoders import make_encoder

        if self.recall < 0:
            raise MemcliError(f"--recall {self.recall}: expected 0 (state only) or more turns")
        if self.recall or self.session_path is not None:
            self.memory = TurnMemory(make_encoder(self.encoder), "hybrid")
        elif self.encoder != "minilm":
            raise MemcliError(f"--encoder {self.encoder}: keys the turn memory, which needs --recall N or --session FILE")
        self.reset_hidden()
        if self.session_path is not None and Path(self.session_path).exists():
            self.load(self.session_path)

    @torch.no_grad()
    def reply(self, text: str, streamer=None) -> str:
        from memcli.hippo.data import prompt_ids
        from memcli.hippo.turns import excerpt_prompt

        if self.memory is not None:
            self.memory.today = self.clock().date()
        self.last_read = self.memory.read(text, self.recall) if self.recall and len(self.memory) else []
        ids = excerpt_prompt(self.tok, self.last_read, text) if self.last_read else prompt_ids(self.tok, text)
        ids = torch.tensor([ids])
        out = self.model.generate(ids, torch.ones_like(ids), state=self.state, streamer=streamer,
                                  **self.options.generate_kwargs(self.tok))
        answer = self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        self.remember(text)  # a dialog has both sides: the message, then the answer, each a turn of the state
        if answer:
            self.remember(answer, "assistant")
        self.save()
        return answer

    @torch.no_grad()
    def remember(self, text: str, role: str = "user") -> None:
        """Write one turn into the state (and the turn memory, when kept)."""
        from memcli.hippo.data import content_ids, turn_ids

        ids = torch.tensor([turn_ids(self.tok, role, text, self.max_turn_length)])
        words = torch.tensor([content_ids(self.tok, text)[-self.max_turn_length:] or [self.tok.pad_token_id]])
        self.state = self.model.write_turns(self.state, ids, torch.ones_like(ids), None, words, torch.ones_like(words))
        self.turns += 1
        if self.memory is not None:
            self.memory.add([{"id": f"T{self.turns}", "speaker": role, "text": text, "session": self.sitting,
                              "date": said(self.clock())}])

    def reset_hidden(self) -> None:
        self.state = self.model.init_state(1)
        self.turns = 0
        self.last_read = []
        if self.memory is not None:
            self.memory.turns, self.memory.keys = [], None

    def reset(self) -> None:
        self.reset_hidden()
        self.save()

    # ---- session file
    def save(self) -> None:
        if self.session_path is None:
            return
        from memcli.hippo.turns import save_session

        meta = {"format": "memcli-hippo-chat", "turns_written": str(self.turns), **self.memory.metadata()}
        save_session(self.session_path, {"state": self.state, **self.memory.state_dict()}, meta)

    def load(self, path) -> None:
        from memcli.hippo.turns import load_session

        tensors, meta = load_session(path)
        if meta.get("format") != "memcli-hippo-chat" or "state" not in tensors:
            raise MemcliError(f"{path}: not a memcli HIPPO chat session (no state)")
        if tuple(tensors["state"].shape) != tuple(self.state.shape):
            raise MemcliError(f"{path}: its memory state has shape {list(tensors['state'].shape)}, this run's is "
                              f"{list(self.state.shape)} (a session of another run)")
        self.memory.load_from(tensors, meta, str(path))
        self.state = tensors["state"].to(self.state.dtype)
        self.turns = int(meta.get("turns_written", len(self.memory)))
        self.sitting = 1 + max((t.get("session", 0) for t in self.memory.turns if isinstance(t.get("session"), int)),
                               default=-1)

    def state_info(self) -> dict:
        return {"turns": self.turns, "state_norm": round(float(self.state.norm()), 6),
                "state_shape": list(self.state.shape)}

    help = HIPPO_HELP

    def json_extra(self) -> dict:
        return {"state": self.state_info(), "memory": self.last_read}

    def command(self, text: str):
        if text in ("/reset_hidden", "reset_hidden", "/reset"):
            self.reset()
            return "memory state cleared" + (", and the turns kept for recall" if self.memory is not None else "")
        if text == "/state":
            info = self.state_info()
            return f"state: {info['turns']} turns, norm {info['state_norm']:.4f}, shape {info['state_shape']}"
        if text == "/memory":
            if self.last_read:
                return ("turns read for the last answer", ["turn", "said", "score", "text"],
                        [(t["id"], t.get("date", ""), t["score"], f"{t['speaker']}: {t['text']}")
                         for t in self.last_read])
            kept = f"; {len(self.memory)} turns kept" if self.memory is not None else ""
            why = "--recall 0: the state alone carries the history" if not self.recall else "nothing stored yet"
            return f"none: no turn was read for the last answer ({why}{kept})"
        return None


@dataclass
class HrpoChatSession:
    """Chat with an HRPO run, decoded as it was trained: hybrid (latent mixing while reasoning, until '####') or plain."""

    model: object
    tok: object
    options: GenOptions
    history: list = field(default_factory=list)
    last_stats: dict = field(default_factory=dict)

    @torch.no_grad()
    def reply(self, text: str, streamer=None) -> str:
        inst = self.model.cfg.instruction  # the run was trained with this after every problem
        self.history.append({"role": "user", "content": f"{text}\n{inst}" if inst else text})
        enc = self.tok.apply_chat_template(self.history, tokenize=True, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
        ro = self.model.generate(self.tok, enc["input_ids"], enc["attention_mask"], self.options.max_new_tokens,
                                 temperature=self.options.temperature, streamer=streamer)
        ids = ro.completion_ids[0][ro.completion_mask[0].bool()]
        a = ro.a_mean
        self.last_stats = {"mixed_tokens": int(ro.mix_mask[0].sum()), "gate_a": None if a != a else round(a, 6)}
        answer = self.tok.decode(ids, skip_special_tokens=True).strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def reset(self) -> None:
        self.history.clear()

    help = HELP.replace(" · /memory entries read for the last answer", "")

    def json_extra(self) -> dict:
        return {"hybrid": self.last_stats}

    def command(self, text: str):
        if text == "/reset":
            self.reset()
            return "history cleared"
        if text == "/memory":
            return "an HRPO model has no memory entries; its latent steps are in the answer's decoding"
        return None


def explicit_session(run, options: GenOptions) -> ChatSession:
    return ChatSession(run.model, run.tok, run.bank, options, plain=run.info.get("answer_format") == "cloze")


def hippo_session(run, options: GenOptions, recall: int = 0, session: str | Path | None = None,
                  encoder: str = "minilm") -> HippoChatSession:
    return HippoChatSession(run.model, run.tok, options, recall=recall,
                            session_path=None if session is None else Path(session), encoder=encoder)


def hrpo_session(run, options: GenOptions) -> HrpoChatSession:
    if options.top_p != 1.0 or options.repetition_penalty != 1.0:
        raise MemcliError("--top-p and --repetition-penalty are not supported by HRPO's hybrid decoding; leave them at 1")
    return HrpoChatSession(run.model, run.tok, options)


def open_session(model_path: str | Path | None, model_type: str, options: GenOptions, out_dir: str | Path = "out",
                 recall: int = 0, session: str | Path | None = None, encoder: str = "minilm"):
    """The chat session for a run: a kind's chat type (``memory`` / ``hippo`` / ``hrpo``) names the kind; ``lora`` /
    ``full`` open a run of any kind whose backbone was trained that way (the newest under ``out_dir`` when no path)."""
    from memcli import kinds
    from memcli.rundir import newest_run
    from memcli.runs import load_run

    if model_type not in MODEL_TYPES:
        raise MemcliError(f"--model-type '{model_type}': expected one of {', '.join(MODEL_TYPES)}")
    options.check()
    kind = kinds.of_chat_type(model_type)
    path = Path(model_path) if model_path else newest_run(out_dir, kind.name if kind else None)
    run = load_run(path)
    if kind is not None and run.kind != kind.name:
        raise MemcliError(f"{path}: --model-type {model_type}, but this is a {run.kind} run (use --model-type "
                          f"{kinds.get(run.kind).chat_type})")
    if model_type in METHOD_TYPES and run.method != model_type:
        raise MemcliError(f"{path}: --model-type {model_type}, but this run's backbone was trained '{run.method}' "
                          f"({'no LoRA adapter' if model_type == 'lora' else 'no full backbone'} to load)")
    factory = kinds.resolve_ref(kinds.get(run.kind).chat)
    if run.kind != "hippo":
        if recall or session is not None or encoder != "minilm":
            raise MemcliError(f"{path}: --recall, --session and --encoder keep a dialog memory, for HIPPO runs (-t hippo); "
                              f"this is a {run.kind} run")
        return factory(run, options), path
    return factory(run, options, recall=recall, session=session, encoder=encoder), path
