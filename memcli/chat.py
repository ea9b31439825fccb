"""Chat with a trained checkpoint: HF ``generate`` with the KV cache, streamed, with conversation history."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from memcli.errors import MemcliError

MODEL_TYPES = ("memory", "lora", "full", "hippo", "hrpo")
HELP = "/exit quit · /reset clear the history · /memory entries read for the last answer · /help this text"
HIPPO_HELP = ("/exit quit · /reset_hidden (or reset_hidden) clear the memory state · /state its norm and turn count · "
              "/help this text")


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

    @torch.no_grad()
    def reply(self, text: str, streamer=None) -> str:
        self.history.append({"role": "user", "content": text})
        enc = self.tok.apply_chat_template(self.history, tokenize=True, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
        ids, att = enc["input_ids"], enc["attention_mask"]
        out = self.model.generate(input_ids=ids, attention_mask=att, streamer=streamer, collect=True,
                                  **self.options.generate_kwargs(self.tok))
        new = out[0, ids.shape[1]:]
        answer = self.tok.decode(new, skip_special_tokens=True).strip()
        self.history.append({"role": "assistant", "content": answer})
        self.last_memory = self._memory_read(ids.shape[1])
        return answer

    def _memory_read(self, prompt_len: int, top: int = 5) -> list[dict]:
        """Entries that carried the most weight over the answer's positions (first memory layer)."""
        recs = [r for r in self.model.ctx["records"] if r["layer"] == self.model.cfg.memory_layers[0]]
        if not recs:
            return []
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


@dataclass
class HippoChatSession:
    """The prompt holds only the current message; earlier turns live in the HIPPO state (constant cost per turn).

    Each user message is answered from the state of the turns before it, then written into the state,
    as in training (the query never sees its own turn in memory).
    """

    model: object
    tok: object
    options: GenOptions
    max_turn_length: int = 64
    state: torch.Tensor | None = None
    turns: int = 0

    def __post_init__(self):
        self.reset_hidden()

    @torch.no_grad()
    def reply(self, text: str, streamer=None) -> str:
        from memcli.hippo.data import prompt_ids

        ids = torch.tensor([prompt_ids(self.tok, text)])
        out = self.model.generate(ids, torch.ones_like(ids), state=self.state, streamer=streamer,
                                  **self.options.generate_kwargs(self.tok))
        answer = self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        self.remember(text)
        return answer

    @torch.no_grad()
    def remember(self, text: str, role: str = "user") -> None:
        """Write one turn into the state."""
        from memcli.hippo.data import turn_ids

        ids = torch.tensor([turn_ids(self.tok, role, text, self.max_turn_length)])
        self.state = self.model.write_turns(self.state, ids, torch.ones_like(ids))
        self.turns += 1

    def reset_hidden(self) -> None:
        self.state = self.model.init_state(1)
        self.turns = 0

    reset = reset_hidden

    def state_info(self) -> dict:
        return {"turns": self.turns, "state_norm": round(float(self.state.norm()), 6),
                "state_shape": list(self.state.shape)}


@dataclass
class HrpoChatSession:
    """Chat with an HRPO run: hybrid decoding (latent mixing while reasoning, until '####'), with history."""

    model: object
    tok: object
    options: GenOptions
    history: list = field(default_factory=list)
    last_stats: dict = field(default_factory=dict)

    @torch.no_grad()
    def reply(self, text: str, streamer=None) -> str:
        self.history.append({"role": "user", "content": text})
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


def newest_run_of(model_path, out_dir, kind: str) -> Path:
    from memcli.explicit.inspect import newest_run

    return Path(model_path) if model_path else newest_run(out_dir, kind)


def _kind_of(path) -> str | None:
    import json

    p = Path(path) / "checkpoint.json"
    try:
        return json.loads(p.read_text()).get("kind") if p.is_file() else None
    except (OSError, ValueError):
        return None


def open_session(model_path: str | Path | None, model_type: str, options: GenOptions, out_dir: str | Path = "out"):
    from memcli.explicit.inspect import newest_run
    from memcli.explicit.io import KIND, load_checkpoint

    if model_type not in MODEL_TYPES:
        raise MemcliError(f"--model-type '{model_type}': expected one of {', '.join(MODEL_TYPES)}")
    options.check()
    if model_type == "hippo":
        from memcli.hippo.io import KIND as HIPPO_KIND
        from memcli.hippo.io import load_hippo

        path = Path(model_path) if model_path else newest_run(out_dir, HIPPO_KIND)
        model, tok, _ = load_hippo(path)
        return HippoChatSession(model, tok, options), path
    from memcli.hrpo.io import KIND as HRPO_KIND

    if model_type == "hrpo" or (model_type in ("lora", "full") and model_path and _kind_of(model_path) == HRPO_KIND):
        from memcli.hrpo.io import load_hrpo

        path = Path(model_path) if model_path else newest_run(out_dir, HRPO_KIND)
        model, tok, info = load_hrpo(path)
        if model_type in ("lora", "full") and info["finetuning_method"] != model_type:
            raise MemcliError(f"{path}: --model-type {model_type}, but this HRPO run's backbone was trained "
                              f"'{info['finetuning_method']}'")
        if options.top_p != 1.0 or options.repetition_penalty != 1.0:
            raise MemcliError("--top-p and --repetition-penalty are not supported by HRPO's hybrid decoding; leave them at 1")
        return HrpoChatSession(model, tok, options), path
    path = Path(model_path) if model_path else newest_run(out_dir, KIND)
    model, tok, bank, info = load_checkpoint(path)
    method = info.get("finetuning_method", model.cfg.mode)
    if model_type == "lora" and method != "lora":
        raise MemcliError(f"{path}: --model-type lora, but this checkpoint's backbone was trained '{method}' (no LoRA adapter)")
    if model_type == "full" and method != "full":
        raise MemcliError(f"{path}: --model-type full, but this checkpoint's backbone was trained '{method}'")
    return ChatSession(model, tok, bank, options), path
