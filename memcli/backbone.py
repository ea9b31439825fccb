"""``load_backbone(spec)`` -> (model, tokenizer): a local HF directory or the built-in ``tiny`` default.

Nothing here touches the network: local directories load with ``local_files_only=True`` and the
tiny default is a Qwen3-architecture config plus a byte-level BPE tokenizer shipped in the package
(trained by ``scripts/train_tokenizer.py``).
"""

from __future__ import annotations

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
# Families whose decoder layers memcli wraps (same layer API as Qwen3).
SUPPORTED_TYPES = ("qwen3", "qwen2", "qwen3_moe", "qwen2_moe", "llama", "mistral")

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


def load_tokenizer(spec: str = "tiny", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _quiet_transformers()

    path = TINY_DIR if spec == "tiny" else Path(spec)
    if spec != "tiny":
        _check_model_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise MemcliError(f"{path}: could not load a tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(vocab_size: int, **overrides):
    from transformers import Qwen3Config

    kw = dict(TINY_CONFIG, **overrides)
    return Qwen3Config(vocab_size=vocab_size, **kw)


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise MemcliError(f"{path}: backbone directory not found (expected 'tiny' or a local HF model directory)")
    if not path.is_dir():
        raise MemcliError(f"{path}: expected a local HF model directory, found a file")


def load_backbone(spec: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False, **tiny_overrides):
    """Return ``(model, tokenizer)``; ``tiny`` is built fresh from ``seed`` (deterministic weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3ForCausalLM

    _quiet_transformers()

    tok = load_tokenizer(spec, trust_remote_code)
    if spec == "tiny":
        cfg = tiny_config(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **tiny_overrides)
        gen = torch.random.fork_rng(devices=[])
        with gen:
            torch.manual_seed(seed)
            model = Qwen3ForCausalLM(cfg)
        model.to(dtype)
        model.config.name_or_path = "tiny"
        return model.eval(), tok
    path = Path(spec)
    _check_model_dir(path)
    if not (path / "config.json").is_file():
        raise MemcliError(f"{path}: no config.json, expected a local HF model directory")
    try:
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        if "custom code" in str(e) and not trust_remote_code:
            raise MemcliError(f"{path}/config.json: asks to run Python code shipped with the model; memcli runs it only "
                              "with model.trust_remote_code=true (pass it only for a model you trust)") from None
        raise MemcliError(f"{path}/config.json: not a valid model config ({str(e).splitlines()[0][:100]})") from None
    if cfg.model_type not in SUPPORTED_TYPES:
        raise MemcliError(f"{path}/config.json: model_type '{cfg.model_type}', expected one of {', '.join(SUPPORTED_TYPES)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except Exception as e:
        raise MemcliError(f"{path}: could not load model weights ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None
    return model.eval(), tok


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


def load_run_backbone(spec: str, full_dir: Path | None, lora_dir: Path | None, want_checksum: float | None,
                      fingerprint: str, hidden_size: int, where: Path):
    """The backbone a HIPPO / HRPO run was trained on -> ``(model, tokenizer, method)``.

    A full-mode run carries its whole backbone (``full_dir``); otherwise the base is re-loaded from
    ``spec``, its weights checked against the recorded checksum, and a LoRA adapter applied when present.
    """
    from memcli.data.bank import tokenizer_fingerprint
    from memcli.explicit.io import backbone_checksum

    if full_dir is not None and full_dir.is_dir():
        bb, tok = load_backbone(str(full_dir))
        method = "full"
    else:
        bb, tok = load_backbone(spec)
        method = "frozen"
        if want_checksum is not None:
            got = backbone_checksum(bb)
            if abs(got - want_checksum) > 1e-6 * max(1.0, abs(want_checksum)):
                raise MemcliError(f"{where}: backbone '{spec}' does not have the weights this run was trained on "
                                  f"(checksum {got:.6g}, expected {want_checksum:.6g})")
        if lora_dir is not None and lora_dir.is_dir():
            from peft import PeftModel

            bb = PeftModel.from_pretrained(bb, str(lora_dir))
            method = "lora"
    if fingerprint and tokenizer_fingerprint(tok) != fingerprint:
        raise MemcliError(f"{where}: tokenizer vocabulary differs from the one this run was trained with")
    if bb.config.hidden_size != hidden_size:
        raise MemcliError(f"{where}: hidden_size {hidden_size} does not match the backbone's ({bb.config.hidden_size})")
    return bb, tok, method
