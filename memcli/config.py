"""Run configuration: dataclass sections ``model``, ``dataset``, ``training``, ``logging``.

A YAML file (``--config``) and ``key=value`` overrides are merged into the structured schema with
OmegaConf, so unknown keys and wrong types are refused with a one-line message that names the key.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from memcli.errors import MemcliError


@dataclass
class ModelConfig:
    backbone: str = "tiny"  # "tiny" (built in) or a local HF directory
    qwen3_model_path: Optional[str] = None  # seed name; when set it is the backbone and the backbone is frozen
    cache_path: Optional[str] = None  # directory written by build-cache
    keys_path: Optional[str] = None  # directory written by build-keys
    memory_layers: List[int] = field(default_factory=lambda: [1])
    knowledge_num: Optional[int] = None  # taken from the cache when None
    knowledge_length: Optional[int] = None
    knowledge_dim: Optional[int] = None  # taken from the keys when None
    num_candidates: int = 16
    topk_per_half: Optional[int] = None  # None: num_candidates
    gate_rank: int = 0  # 0: full-rank query projection
    fusion_rank: int = 0  # 0: full-rank fusion
    freeze_keys: bool = False
    rerank: bool = True  # re-score product-key candidates by content keys W_k(pooled entry)
    retrieval: str = "auto"  # auto (exact content-key search up to 16,384 entries, else product keys) | exact | product
    finetuning_method: str = "auto"  # auto (tiny: full, a real Qwen3: frozen) | frozen | lora | full
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    trust_remote_code: bool = False
    # HIPPO dialog memory (train hippo); memory_layers are its fusion layers
    hippo_variant: str = "matrix"  # matrix (light, time-invariant decay) | selective (Mamba-style, input-dependent)
    hippo_heads: int = 4
    hippo_state_dim: int = 32  # keys per head (rows of each head's matrix state)
    hippo_value_dim: int = 64  # values per head (matrix variant; selective uses expand*hidden/heads)
    hippo_init: str = "s4d_real"  # s4d_real (diagonal A) | legs (HiPPO-LegS, dense A)
    hippo_expand: int = 2
    # where turn features come from; None / auto: the last position of the last layer for a pretrained
    # backbone, the mean of the input embeddings for the tiny one (trained from scratch, its deeper
    # states carry nothing yet: measured, EM stayed at chance for 600 steps with them)
    hippo_feature_layer: Optional[int] = None
    hippo_pool: str = "auto"  # auto | last (causal position) | mean over the turn | tokens (every position writes k v^T)
    # HRPO latent reasoning (train hrpo)
    thinking_source: str = "probs"  # probs (p @ W_embed / ||p||) | projection (learnable, of the last hidden state)
    thinking_r_min: float = 0.99  # initial embedding share a lies in [r_min, r_max]
    thinking_r_max: float = 0.999


@dataclass
class DatasetConfig:
    data_dir: str = "data/default"
    sft_dataset_path: Optional[str] = None
    sft_val_dataset_path: Optional[str] = None
    labeled_path: Optional[str] = None
    omcq_eval_path: Optional[str] = None
    knowledge_path: Optional[str] = None
    pretrained_router_path: Optional[str] = None
    max_length: int = 128
    max_turn_length: int = 64  # tokens kept per dialog turn (HIPPO)
    train_path: Optional[str] = None  # HRPO: GSM8K-format JSONL (question, answer with '#### n')
    eval_path: Optional[str] = None  # HRPO: test file for greedy accuracy


@dataclass
class TrainingConfig:
    seed: int = 42
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = 32
    accumulation_steps: int = 1
    learning_rate: float = 1e-3
    memory_lr: Optional[float] = None
    backbone_lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"  # cosine | linear | constant (after the warmup)
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16
    eval_interval: int = 200
    eval_num_samples: int = 200
    final_eval_num_samples: Optional[int] = None  # items in the end-of-training evaluation; None = all held-out
    save_interval: int = 500
    resume: Optional[str] = None  # auto | PATH
    on_nonfinite: str = "stop"  # NaN/inf loss or gradients: stop (last good state kept) | skip (drop that optimizer step)
    max_skipped_steps: int = 10  # with on_nonfinite=skip: stop once this many optimizer steps were dropped
    deterministic: bool = True  # torch deterministic algorithms: same seed, same weights (measured: no CPU slowdown)
    dist_timeout_s: int = 600  # a collective waiting longer than this (a rank died or hangs) ends every rank
    zero_stage: int = 0
    router_loss_coef: float = 1.0
    counterfactual_prob: float = 0.5
    balance_loss_coef: float = 0.01
    similarity_loss_coef: float = 0.0
    diversity_loss_coef: float = 0.0
    ema_update_freq: int = 0  # 0: off
    ema_decay: float = 0.9
    freeze_ratio: float = 0.0
    stage1_epochs: int = 1  # HIPPO: epochs that train the memory encoder and gates only
    hippo_lr: Optional[float] = None  # HIPPO encoder + gates; None: 5e-5 (a real backbone) or 3e-3 (tiny)
    # HRPO (GRPO with hybrid latent reasoning); batch_size counts prompts, each sampled group_size times
    group_size: int = 4
    temperature: float = 0.5
    max_completion_length: int = 64
    beta: float = 0.005  # KL to the reference (k3 estimator); 0 skips the reference forward
    gate_lr: float = 1e-4  # thinking_residual_gate_r / _gate_i
    lambda_lr: float = 1e-3  # thinking_residual_Lambda
    projection_lr: float = 1e-4  # thinking_projection
    hybrid: bool = True  # False: plain GRPO (token inputs only)
    reward_fn: str = "memcli.hrpo.rewards:gsm8k_reward"  # module:function(completions, answers, prompts) -> floats
    log_completions_interval: int = 50  # optimizer steps between tables of sample completions (0: never)
    device: str = "auto"


@dataclass
class LoggingConfig:
    out_dir: str = "out"
    run_name: Optional[str] = None
    log_interval: int = 20
    tensorboard: bool = True
    wandb: bool = False
    swanlab: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def valid_keys(schema: Any = Config, prefix: str = "") -> list[str]:
    out = []
    for f in fields(schema):
        name = f"{prefix}{f.name}"
        typ = f.type if not isinstance(f.type, str) else None
        default = f.default_factory() if f.default_factory is not field().default_factory else f.default  # type: ignore
        if is_dataclass(default):
            out.extend(valid_keys(type(default), name + "."))
        else:
            out.append(name)
    return out


def _suggest(key: str, schema: Any) -> str:
    keys = valid_keys(schema)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # also try the last component alone (e.g. "learnin_rate" without a section)
        leaf = key.split(".")[-1]
        by_leaf = {k.split(".")[-1]: k for k in keys}
        m = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[m[0]]] if m else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _explain(e: OmegaConfBaseException, source: str, schema: Any) -> MemcliError:
    key = getattr(e, "full_key", None) or ""
    if isinstance(e, ConfigKeyError) or "not in" in str(e) or "Key '" in str(e) and "not" in str(e):
        return MemcliError(f"{source}: unknown key '{key}'{_suggest(key, schema)}")
    if isinstance(e, ValidationError):
        exp = getattr(e, "ref_type", None) or getattr(e, "object_type", None)
        msg = str(e).splitlines()[0]
        want = msg.split("converted to ")[-1] if "converted to" in msg else msg
        val = getattr(e, "value", None) if hasattr(e, "value") else None
        return MemcliError(f"{source}: key '{key}' got {val!r}, expected {want.strip().lower()}")
    return MemcliError(f"{source}: {str(e).splitlines()[0]} (key '{key}')")


def parse_overrides(overrides: Sequence[str]) -> list[str]:
    out = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise MemcliError(f"override '{item}': expected key=value (for example training.learning_rate=3e-4)")
        out.append(item)
    return out


def load_config(
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    schema: Any = Config,
    defaults: dict | None = None,
):
    """Schema defaults <- per-command ``defaults`` <- YAML ``config_file`` <- ``key=value`` overrides."""
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    layers: list[tuple[str, Any]] = []
    if defaults:
        layers.append(("command defaults", OmegaConf.create(defaults)))
    if config_file is not None:
        p = Path(config_file)
        if not p.is_file():
            raise MemcliError(f"{p}: config file not found" if not p.exists() else f"{p}: expected a YAML file, found a directory")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f"{p}:{line + 1}" if line is not None else str(p)
            raise MemcliError(f"{where}: invalid YAML ({getattr(e, 'problem', 'parse error')})") from None
        except UnicodeDecodeError:
            raise MemcliError(f"{p}: not UTF-8 text, expected a YAML file") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise MemcliError(f"{p}: top level is {type(data).__name__}, expected a mapping of sections")
        layers.append((str(p), OmegaConf.create(data)))
    ov = parse_overrides(overrides)
    for item in ov:
        try:
            layers.append((f"override '{item}'", OmegaConf.from_dotlist([item])))
        except (OmegaConfBaseException, yaml.YAMLError) as e:  # the value is parsed as YAML
            raise MemcliError(f"override {item!r}: {(str(e).splitlines() or ['cannot be parsed'])[0]}") from None
    cfg = base
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise _explain(e, source, schema) from None
    obj = OmegaConf.to_object(cfg)
    _check_values(obj)
    return obj


_CHOICES = {
    ("model", "finetuning_method"): ("auto", "frozen", "lora", "full"),
    ("training", "mixed_precision"): ("no", "bf16", "fp16"),
    ("model", "retrieval"): ("auto", "exact", "product"),
    ("training", "zero_stage"): (0, 1, 2, 3),
    ("training", "lr_scheduler"): ("cosine", "linear", "constant"),
    ("model", "hippo_variant"): ("matrix", "selective"),
    ("model", "hippo_init"): ("s4d_real", "legs"),
    ("model", "hippo_pool"): ("auto", "last", "mean", "tokens"),
    ("training", "on_nonfinite"): ("stop", "skip"),
}


def _check_values(cfg: Any) -> None:
    lg = getattr(cfg, "logging", None)
    name = getattr(lg, "run_name", None)
    # the run directory is out_dir/run_name: a name may not climb out of out_dir or hide as a dot-directory
    if name is not None and (not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*", str(name)) or len(str(name)) > 128):
        raise MemcliError(f"key 'logging.run_name' got {name!r}, expected a plain directory name (letters, digits, "
                          "'_', '-', '.', no path separators)")
    for (sec, key), choices in _CHOICES.items():
        s = getattr(cfg, sec, None)
        if s is not None and hasattr(s, key) and getattr(s, key) not in choices:
            raise MemcliError(f"key '{sec}.{key}' got {getattr(s, key)!r}, expected one of {', '.join(map(str, choices))}")
    m = getattr(cfg, "model", None)
    kn = getattr(m, "knowledge_num", None)
    if kn is not None and not (kn > 0 and math.isqrt(kn) ** 2 == kn):
        raise MemcliError(f"key 'model.knowledge_num' got {kn}, expected a perfect square (product keys use "
                          "sqrt(knowledge_num) keys per half), e.g. 1024 or 1048576")
    t = getattr(cfg, "training", None)
    if t is not None:
        for k in ("batch_size", "accumulation_steps", "epochs", "dist_timeout_s"):
            if hasattr(t, k) and getattr(t, k) < 1:
                raise MemcliError(f"key 'training.{k}' got {getattr(t, k)}, expected a positive integer")
        if hasattr(t, "learning_rate") and not t.learning_rate > 0:
            raise MemcliError(f"key 'training.learning_rate' got {t.learning_rate}, expected a positive number")
        for k in ("counterfactual_prob", "freeze_ratio"):
            if hasattr(t, k) and not 0.0 <= getattr(t, k) <= 1.0:
                raise MemcliError(f"key 'training.{k}' got {getattr(t, k)}, expected a value in [0, 1]")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
