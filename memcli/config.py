"""One config schema per recipe: ``train router|fusion|memory|hippo|hrpo``.

Each recipe is a dataclass tree with sections ``model``, ``dataset``, ``training``, ``logging`` that
holds only the keys that recipe reads. Shared pieces (backbone, LoRA, the training loop, logging)
are defined once and composed by inheritance; choices are enums, so OmegaConf refuses a value
outside them. A YAML file (``--config``) and ``key=value`` overrides are merged into the schema;
an unknown key is refused with one line that names the closest key *of that recipe*.

Defaults live here. The few that depend on the backbone (the tiny model trained from scratch vs a
pretrained model) are ``None`` in the dataclass and filled by :func:`resolve` from the recipe's
``backbone_defaults``, in one place next to the schema; ``--print-config`` shows them resolved.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, List, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from memcli.errors import MemcliError


# --------------------------------------------------------------------------- choices


class Method(str, Enum):
    """How the backbone trains: ``auto`` resolves per backbone (tiny: full, pretrained: frozen)."""

    auto = "auto"
    frozen = "frozen"
    lora = "lora"
    full = "full"


class Precision(str, Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class Scheduler(str, Enum):
    """After the linear warmup (transformers' schedules of the same names)."""

    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class OnNonfinite(str, Enum):
    stop = "stop"
    skip = "skip"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"


class Retrieval(str, Enum):
    auto = "auto"  # exact up to EXACT_LIMIT entries, product keys above
    exact = "exact"
    product = "product"


class Read(str, Enum):
    """How a retrieved entry reaches the model."""

    additive = "additive"  # pooled token embeddings fused into the memory layer's output (GatedMemoryFusion)
    prefix = "prefix"  # the entries' token ids placed before the input, where a pretrained model already reads


class Placement(str, Enum):
    """Where read=prefix writes the retrieved entries into a chat-template prompt (memcli/retrieval/placement.py);
    a cloze prompt (no template) is always read with the entries before it."""

    prefix = "prefix"  # before the whole prompt, template included (the only read before release 4)
    system = "system"  # in the system message, after the template's default one
    user_before = "user_before"  # in the last user message, before the question
    user_after = "user_after"  # in the last user message, after the question


class Anchor(str, Enum):
    """With model.anchor_df: what ties a question to the entry it may read (memcli/explicit/model.py chosen_rows)."""

    word = "word"  # the top candidate, when it shares with the question a word at most anchor_df entries hold
    subject = "subject"  # the best candidate whose recorded subject the question names (no subject: the word rule)


class ProjectionNorm(str, Enum):
    unit = "unit"  # the thinking vector is the projection's L2-normalised direction
    embedding = "embedding"  # that direction times the embedding rows' mean norm (the token embedding's scale)


class Query(str, Enum):
    token = "token"  # each position's own hidden state at the memory layer
    mean = "mean"  # the causal running mean of the memory layer's states (standardised)


class EntryKey(str, Enum):
    embeddings = "embeddings"  # mean of the entry's input token embeddings (computed every forward)
    hidden = "hidden"  # mean of the entry's hidden states at the memory layer (base model, standardised)


class AnswerFormat(str, Enum):
    letter = "letter"  # ExplicitLM's multiple choice, answered "C:text" after a chat prompt
    cloze = "cloze"  # the entry's sentence cut before its object, answered with the object text


class BalanceForm(str, Enum):
    soft = "soft"  # KL(usage || uniform) + Gini on the soft selection weights
    seed = "seed"  # ExplicitLM's kl_div(log P, U) on hard selection counts (straight-through gradient)


class Variant(str, Enum):
    matrix = "matrix"
    selective = "selective"


class HippoInit(str, Enum):
    s4d_real = "s4d_real"
    legs = "legs"


class Pool(str, Enum):
    last = "last"
    mean = "mean"
    tokens = "tokens"


class ThinkingSource(str, Enum):
    probs = "probs"
    projection = "projection"


# --------------------------------------------------------------------------- shared sections


@dataclass
class BackboneFields:
    backbone: str = "tiny"  # tiny (built in), smollm2-135m (fetched once, memcli download), a local HF directory, a .gguf file
    qwen3_model_path: Optional[str] = None  # the seeds' name for backbone; when set it is the backbone
    trust_remote_code: bool = False  # run Python code shipped with a local model (only for models you trust)


@dataclass
class LoraFields:
    """Keys of recipes that can train the backbone."""

    finetuning_method: Method = Method.auto  # auto (tiny: full; pretrained: frozen, hippo and hrpo lora) | frozen | lora | full
    lora_rank: int = 8  # LoRA adapters on every attention and MLP projection
    lora_alpha: int = 16  # LoRA scale numerator (scale = alpha / rank)
    lora_dropout: float = 0.0  # dropout on the LoRA path


@dataclass
class TrainableBackboneFields(BackboneFields, LoraFields):
    pass


@dataclass
class LoopFields:
    """The shared training loop (memcli/training/loop.py)."""

    seed: int = 42  # model init, data order, counterfactual draws, sampling
    epochs: Optional[int] = None  # passes over the training items; None: per backbone
    max_steps: Optional[int] = None  # optimizer steps; None: as many as the epochs give
    batch_size: Optional[int] = None  # per process; None: per backbone
    accumulation_steps: int = 1  # micro-batches per optimizer step
    weight_decay: float = 0.0  # AdamW's
    warmup_ratio: float = 0.05  # share of the optimizer steps with a linear warmup
    lr_scheduler: Scheduler = Scheduler.cosine  # after the warmup: cosine | linear (to 0) | constant
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    mixed_precision: Precision = Precision.no  # no | bf16 | fp16 (accelerate)
    eval_interval: int = 100  # optimizer steps between evaluations (0: only at the end)
    eval_num_samples: int = 100  # items per evaluation during training
    final_eval_num_samples: Optional[int] = None  # items in the end-of-training evaluation; None: all
    save_interval: int = 500  # optimizer steps between resumable states
    resume: Optional[str] = None  # auto | PATH
    on_nonfinite: OnNonfinite = OnNonfinite.stop  # NaN/inf loss or gradients: stop | skip that optimizer step
    max_skipped_steps: int = 10  # with on_nonfinite=skip: stop once this many optimizer steps were dropped
    deterministic: bool = True  # torch deterministic algorithms: same seed, same weights
    device: Device = Device.auto  # auto (accelerate's choice) | cpu


@dataclass
class DistributedFields:
    """Keys of recipes that run under `accelerate launch` (DDP, DeepSpeed ZeRO)."""

    zero_stage: int = 0  # DeepSpeed ZeRO stage (0: off; 1-3 under accelerate launch --use_deepspeed)
    dist_timeout_s: int = 600  # a collective waiting longer than this (a rank died or hangs) ends every rank


@dataclass
class LoggingSection:
    out_dir: str = "out"  # where run directories are made
    run_name: Optional[str] = None  # the run directory is out_dir/run_name (default: the recipe's name)
    log_interval: int = 20  # optimizer steps between console lines (when no progress bar is shown)
    tensorboard: bool = True  # TensorBoard event files in the run directory (offline)
    wandb: bool = False  # log to Weights & Biases when installed (keys from the environment)
    swanlab: bool = False  # log to SwanLab when installed


# --------------------------------------------------------------------------- the recipes' base


class Schema:
    """What every recipe schema does: resolve its per-backbone defaults, check itself, turn into a plain dict.
    (Methods, so that a wrapper that forwards attribute reads, like the tests' access recorder, reaches them.)"""

    command: ClassVar[str]
    backbone_defaults: ClassVar[dict]

    def resolve(self):
        return _resolve(self)

    def validate(self) -> None:
        """The recipe's own checks, run before any data or model work (``_check_values`` checks single values)."""

    def to_dict(self) -> dict:
        return OmegaConf.to_container(OmegaConf.structured(self), enum_to_str=True)  # type: ignore[return-value]


# --------------------------------------------------------------------------- explicit memory


@dataclass
class RouterModel(BackboneFields):
    cache_path: Optional[str] = None  # directory written by build-cache (default: <data_dir>/cache)
    keys_path: Optional[str] = None  # directory written by build-keys (default: <data_dir>/keys)
    memory_layers: Optional[List[int]] = None  # decoder layers that retrieve; None: per backbone
    knowledge_num: Optional[int] = None  # taken from the cache; a value given here is checked against it
    knowledge_length: Optional[int] = None  # tokens per entry, taken from the cache (checked when given)
    knowledge_dim: Optional[int] = None  # query / key width, taken from the keys (checked when given)
    num_candidates: int = 16  # entries retrieved per query (the read mixes them; recall@k uses k = this)
    topk_per_half: Optional[int] = None  # product keys: candidates per half; None: num_candidates
    gate_rank: int = 0  # 0: full-rank query projection; r > 0: two factors of rank r
    freeze_keys: bool = False  # keep build-keys' product keys fixed
    rerank: bool = True  # re-score product-key candidates by content keys
    retrieval: Retrieval = Retrieval.auto  # auto (exact up to 16,384 entries, else product) | exact | product
    query: Optional[Query] = None  # token (each position's state) | mean (causal running mean); None: per backbone
    entry_key: Optional[EntryKey] = None  # embeddings (pooled input embeddings) | hidden (its states); None: per backbone


@dataclass
class FusionModel(RouterModel):
    fusion_rank: int = 0  # 0: full-rank GatedMemoryFusion


@dataclass
class MemoryModel(FusionModel, LoraFields):
    read: Optional[Read] = None  # additive (fused at the layer) | prefix (entry tokens before the input); None: per backbone
    prefix_entries: int = 1  # read=prefix: retrieved entries placed before the input
    placement: Placement = Placement.user_after  # read=prefix: where a chat prompt gets its entries (prefix | system | user_before | user_after)
    abstain_below: Optional[float] = None  # read=prefix, cosine retrieval: read no entry when the best one's cosine is below this
    # (a question no entry is about shares only common words with its nearest entry, never a name)
    anchor_df: Optional[int] = None  # read=prefix: read an entry only if it shares a word with the question that at most this many entries hold; 0: always read
    anchor: Anchor = Anchor.subject  # with anchor_df: subject (read the best candidate whose subject the question names) | word (the top one, if it shares a rare word)
    # the router's scores z-fused with the text scorers' over the question (memcli/retrieval/fusion.py)
    lexical_weight: Optional[float] = None  # read=prefix: BM25's weight in the fusion (the router's is 1); 0: left out
    dense_weight: Optional[float] = None  # read=prefix: the sentence encoder's weight in the fusion; 0: left out
    encoder: str = "minilm"  # the sentence encoder of dense_weight: minilm, mpnet (memcli download mpnet) or a directory


@dataclass
class RouterDataset:
    data_dir: Optional[str] = None  # None: data/default (tiny) or data/<backbone> (pretrained), built when absent
    sft_dataset_path: Optional[str] = None  # SFT conversations (default: <data_dir>/sft_train.jsonl)
    sft_val_dataset_path: Optional[str] = None  # held-out conversations (default: <data_dir>/sft_val.jsonl)
    labeled_path: Optional[str] = None  # router labels (default: <keys_path>/train_labeled.jsonl)
    answer_format: Optional[AnswerFormat] = None  # letter (ExplicitLM's C:text) | cloze (object after the cut sentence)
    max_prompt_length: int = 128  # prompt tokens kept (the end is kept)
    # (held-out templates are never trained on: memcli/data/forms.py, compare editing asks with them)
    paraphrases: Optional[bool] = None  # cloze: also train on the relation's training templates and its question; None: per backbone


@dataclass
class FusionDataset(RouterDataset):
    omcq_eval_path: Optional[str] = None  # held-out questions (default: <data_dir>/omcq_val.json)
    pretrained_router_path: Optional[str] = None  # run directory of 'train router' (required by fusion)


@dataclass
class MemoryDataset(FusionDataset):
    pretrained_fusion_path: Optional[str] = None  # run directory of 'train fusion': its fusion + MemoryNorm, strictly
    # language-model pretraining on raw text instead of questions (MiniMind's format: {"text": ...} per line)
    text_path: Optional[str] = None  # set: next-token loss over whole texts, validation loss and perplexity
    text_val_path: Optional[str] = None  # held-out texts (default: the last 5% of text_path)
    max_text_length: int = 64  # tokens kept per text (its start)


@dataclass
class RouterTraining(LoopFields, DistributedFields):
    learning_rate: Optional[float] = None  # memory parameters; None: per backbone


@dataclass
class FusionTraining(RouterTraining):
    # (pretrained: false, the letter format is at chance on SmolLM2-135M and doubled the final evaluation's time)
    final_eval_other_format: Optional[bool] = None  # final evaluation also in the other answer format; None: per backbone


@dataclass
class MemoryTraining(FusionTraining):
    backbone_lr: Optional[float] = None  # LoRA adapters or the full backbone; None: per backbone
    router_loss_coef: float = 1.0  # weight of the retrieval loss toward the labelled entries
    counterfactual_prob: float = 0.5  # share of labelled items whose entry is rewritten (batch-local) per step
    balance_loss_coef: float = 0.01  # weight of the usage balance term (training.balance_form)
    balance_form: BalanceForm = BalanceForm.soft  # soft: KL(usage||U) + Gini on soft weights | seed: KL(U||hard counts)
    similarity_loss_coef: float = 0.0  # 1 - cos(query, key of its chosen entries)
    diversity_loss_coef: float = 0.0  # mean cosine between one query's candidate keys
    ema_update_freq: int = 0  # optimizer steps between EMA token updates of the bank; 0: off
    ema_decay: float = 0.9  # EMA: entry tokens move (1 - decay) toward the states that read them
    freeze_ratio: float = 0.0  # share of bank rows EMA never touches


_EXPLICIT_TINY = {"model": {"memory_layers": [1], "query": "token", "entry_key": "embeddings", "read": "additive",
                            "lexical_weight": 0.0, "dense_weight": 0.0, "anchor_df": 0},
                  "dataset": {"answer_format": "letter", "paraphrases": False},
                  "training": {"batch_size": 32, "learning_rate": 3e-3, "backbone_lr": 1e-3,
                               "final_eval_other_format": True}}
# measured on SmolLM2-135M (README "Explicit memory on a pretrained model"): retrieval from the mean of the
# layer-8 states, keys from the entries' own layer-8 states, the entry's tokens read as a prefix
# release 4, measured on the recipe's run (README "The read where the model reads"): the router fused with BM25 and
# all-MiniLM-L6-v2 at equal weights, and an entry read only when the question names its subject (model.anchor, the
# schema's default; an entry without one: a shared word that at most 10 entries hold), so a question no entry is
# about reads nothing
_EXPLICIT_PRETRAINED = {"model": {"memory_layers": [8], "query": "mean", "entry_key": "hidden", "read": "prefix",
                                  "lexical_weight": 1.0, "dense_weight": 1.0, "anchor_df": 10},
                        "dataset": {"answer_format": "cloze", "paraphrases": True},
                        "training": {"batch_size": 64, "learning_rate": 1e-3, "backbone_lr": 1e-4,
                                     "final_eval_other_format": False}}


def _explicit_defaults(tiny_epochs: int, pretrained_epochs: int) -> dict:
    out = {}
    for kind, base, epochs in (("tiny", _EXPLICIT_TINY, tiny_epochs), ("pretrained", _EXPLICIT_PRETRAINED, pretrained_epochs)):
        d = {sec: dict(v) for sec, v in base.items()}
        d["training"]["epochs"] = epochs
        out[kind] = d
    return out


@dataclass
class RouterRecipe(Schema):
    command: ClassVar[str] = "train router"
    backbone_defaults: ClassVar[dict] = _explicit_defaults(8, 12)
    model: RouterModel = field(default_factory=RouterModel)
    dataset: RouterDataset = field(default_factory=RouterDataset)
    training: RouterTraining = field(default_factory=RouterTraining)
    logging: LoggingSection = field(default_factory=LoggingSection)


    def validate(self) -> None:
        _check_paraphrases(self.dataset)


def _check_paraphrases(ds: RouterDataset) -> None:
    if ds.paraphrases and ds.answer_format == AnswerFormat.letter:
        raise MemcliError("key 'dataset.paraphrases' is true but dataset.answer_format is letter: the training templates "
                          "and questions are asked in the cloze format (set answer_format=cloze, or paraphrases=false)")


@dataclass
class FusionRecipe(Schema):
    command: ClassVar[str] = "train fusion"
    backbone_defaults: ClassVar[dict] = _explicit_defaults(8, 4)
    model: FusionModel = field(default_factory=FusionModel)
    dataset: FusionDataset = field(default_factory=FusionDataset)
    training: FusionTraining = field(default_factory=FusionTraining)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def validate(self) -> None:
        _check_paraphrases(self.dataset)
        if not self.dataset.pretrained_router_path:
            raise MemcliError("train fusion needs dataset.pretrained_router_path (the output of 'memcli train router')")


@dataclass
class MemoryRecipe(Schema):
    command: ClassVar[str] = "train memory"
    # tiny: 600 optimizer steps of 32 on the synthetic base (the learning check's recipe)
    # pretrained: 4 passes over 5,713 items (each fact as its cloze, 4 training templates, its question, its router-only
    # question) = 357 steps of 64, about the 300 steps of 12 passes over the cloze items alone
    backbone_defaults: ClassVar[dict] = _explicit_defaults(24, 4)
    model: MemoryModel = field(default_factory=MemoryModel)
    dataset: MemoryDataset = field(default_factory=MemoryDataset)
    training: MemoryTraining = field(default_factory=MemoryTraining)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def validate(self) -> None:
        _check_paraphrases(self.dataset)
        m, method = self.model, self.model.finetuning_method
        if m.read == Read.prefix and method == Method.full:
            raise MemcliError("model.read=prefix retrieves with the base model's states and cannot train the whole "
                              "backbone; use model.finetuning_method=lora (or frozen)")
        if m.entry_key == EntryKey.hidden and method == Method.full:
            raise MemcliError("model.entry_key=hidden takes keys from the base model's states, which must stay fixed; "
                              "use model.finetuning_method=lora or frozen (or entry_key=embeddings)")
        if m.read == Read.additive and m.query == Query.mean and method != Method.frozen:
            raise MemcliError("model.query=mean with read=additive needs finetuning_method=frozen (the running mean is "
                              "taken over the states of the backbone being trained)")
        if self.dataset.text_path and m.read != Read.additive:
            raise MemcliError("dataset.text_path (language-model pretraining) needs model.read=additive")
        if m.abstain_below is not None and not (m.read == Read.prefix and m.query == Query.mean
                                                and m.entry_key == EntryKey.hidden and -1 <= m.abstain_below <= 1):
            raise MemcliError(f"key 'model.abstain_below' got {m.abstain_below}: it is a cosine in [-1, 1] and needs the "
                              "cosine retrieval of model.read=prefix, query=mean, entry_key=hidden")
        if m.anchor_df and not (m.read == Read.prefix and m.anchor_df >= 1):
            raise MemcliError(f"key 'model.anchor_df' got {m.anchor_df}: expected 0 (off) or a count of entries >= 1 "
                              "with model.read=prefix")
        for key in ("lexical_weight", "dense_weight"):
            w = getattr(m, key)
            if w and not (m.read == Read.prefix and w > 0):
                raise MemcliError(f"key 'model.{key}' got {w}: expected a weight >= 0 with model.read=prefix (the "
                                  "question's text is scored against the entries written into the prompt)")
        if self.training.ema_update_freq and m.read == Read.prefix:
            raise MemcliError("training.ema_update_freq needs model.read=additive (EMA moves entries toward the hidden "
                              "states that read them)")


# --------------------------------------------------------------------------- HIPPO


@dataclass
class HippoModelSection(TrainableBackboneFields):
    memory_layers: Optional[List[int]] = None  # layers the state is read into (prefix: whose states pick the read)
    hippo_variant: Variant = Variant.matrix  # matrix (light, time-invariant decay) | selective (Mamba-style)
    hippo_heads: int = 4  # heads of the matrix state
    hippo_state_dim: int = 32  # keys per head (rows of each head's matrix state)
    hippo_value_dim: Optional[int] = None  # matrix: values per head (None: 64); selective: fixed by expand
    hippo_init: HippoInit = HippoInit.s4d_real  # A from S4D-Real (diagonal) | HiPPO-LegS (dense)
    hippo_expand: Optional[int] = None  # selective: inner width = expand * hidden (None: 2); matrix: unused
    hippo_feature_layer: Optional[int] = None  # hidden_states index of the turn features (0: embeddings); None: per backbone
    hippo_pool: Pool = Pool.mean  # how a turn's states become one vector: mean | last | tokens (one per token)
    hippo_standardise: Optional[bool] = None  # standardise turn features and read states; None: per backbone
    hippo_read: Optional[Read] = None  # additive (into memory_layers) | prefix (memory tokens); None: per backbone
    hippo_memory_tokens: int = 16  # hippo_read=prefix: words kept per turn, read back as memory tokens
    hippo_prompt_tokens: int = 8  # hippo_read=prefix: learned soft-prompt vectors before them


@dataclass
class HippoDataset:
    data_dir: str = "data/dialog"  # generated with the default recipe when absent and no train_path is given
    train_path: Optional[str] = None  # dialogs JSONL (default: <data_dir>/data_train.jsonl)
    eval_path: Optional[str] = None  # validation dialogs (default: <data_dir>/data_val.jsonl)
    max_turn_length: int = 64  # tokens kept per dialog turn (its end)
    max_prompt_length: int = 64  # tokens kept of the query prompt (its end)


@dataclass
class HippoTraining(LoopFields, DistributedFields):
    learning_rate: Optional[float] = None  # the HIPPO encoder and gates; None: per backbone
    backbone_lr: Optional[float] = None  # stage 2 (LoRA or full); None: per backbone
    stage1_epochs: Optional[float] = None  # epochs (fractions allowed) training the encoder and gates only; None: per backbone
    load_best_model: bool = True  # end with the weights of the lowest validation loss seen at an evaluation (seed's)


@dataclass
class HippoRecipe(Schema):
    command: ClassVar[str] = "train hippo"
    # tiny: 2 epochs of the default dialogs (1,124 steps of 32), constant rate after warmup (a cosine decay
    # reaches the recall transition, around step 500, at half the rate, and stalls it)
    backbone_defaults: ClassVar[dict] = {
        "tiny": {"model": {"memory_layers": [1], "hippo_feature_layer": 0, "hippo_standardise": False,
                           "hippo_read": "additive"},
                 "training": {"epochs": 2, "stage1_epochs": 1, "batch_size": 32, "learning_rate": 3e-3,
                              "backbone_lr": 1e-3}},
        # pretrained: the seed's staging (memory first, then the backbone unfrozen, here with LoRA), sized for
        # 2 CPU cores: 600 steps of 16, the first 0.25 epoch (281 steps of the default 18,000 dialogs) stage 1
        "pretrained": {"method": "lora",
                       "model": {"memory_layers": [8], "hippo_feature_layer": 9, "hippo_standardise": True,
                                 "hippo_read": "prefix"},
                       "training": {"epochs": 1, "max_steps": 600, "stage1_epochs": 0.25, "batch_size": 16,
                                    "learning_rate": 1e-3, "backbone_lr": 1e-4}},
    }
    model: HippoModelSection = field(default_factory=HippoModelSection)
    dataset: HippoDataset = field(default_factory=HippoDataset)
    training: HippoTraining = field(default_factory=lambda: HippoTraining(lr_scheduler=Scheduler.constant,
                                                                          eval_interval=200))
    logging: LoggingSection = field(default_factory=LoggingSection)

    def validate(self) -> None:
        if self.training.stage1_epochs < 0:
            raise MemcliError(f"key 'training.stage1_epochs' got {self.training.stage1_epochs}, expected >= 0")


# --------------------------------------------------------------------------- HRPO


@dataclass
class HrpoModelSection(TrainableBackboneFields):
    thinking_source: ThinkingSource = ThinkingSource.probs  # probs (p @ W_embed / ||p||) | projection (learnable)
    thinking_r_min: float = 0.99  # the initial embedding share a lies in [r_min, r_max]
    thinking_r_max: float = 0.999  # (see thinking_r_min)
    projection_init_std: float = 0.001  # thinking_source=projection: normal init std of thinking_projection (the design's)
    projection_norm: ProjectionNorm = ProjectionNorm.unit  # projection: unit (L2-normalised, the design's) | embedding (x the rows' mean norm)


@dataclass
class HrpoDataset:
    train_path: Optional[str] = None  # GSM8K-format JSONL (default: the built-in arithmetic task, data/arithmetic)
    eval_path: Optional[str] = None  # problems for greedy accuracy (default: data/arithmetic/test.jsonl)
    max_prompt_length: int = 512  # prompt tokens kept (the end); longer prompts are counted and reported
    instruction: Optional[str] = None  # appended to every problem in the prompt; None: per backbone


STEP_BY_STEP = "Think step by step, then give the final answer after '####'."
ONE_LINE = "Solve it in one short line and end with '#### <number>', for example: 2 + 3 = 5 #### 5"


@dataclass
class HrpoTraining(LoopFields):
    backbone_lr: Optional[float] = None  # the policy (LoRA or full); None: per backbone
    gate_lr: float = 1e-4  # thinking_residual_gate_r / _gate_i
    lambda_lr: float = 1e-3  # thinking_residual_Lambda
    projection_lr: float = 1e-4  # thinking_projection
    group_size: int = 4  # samples per problem; batch_size counts problems
    temperature: float = 0.5  # sampling temperature of the rollouts
    max_completion_length: Optional[int] = None  # None: per backbone
    beta: float = 0.005  # KL to the reference (k3 estimator); 0 skips the reference forward
    hybrid: bool = True  # False: plain GRPO (token inputs only)
    reward_fn: str = "memcli.hrpo.rewards:gsm8k_reward"  # module:function(completions, answers, prompts) -> floats
    log_completions_interval: int = 20  # optimizer steps between tables of sample completions (0: never)
    gradient_checkpointing: bool = True  # recompute the backbone's layers in the replay's backward (SmolLM2: 7.2 -> 3.6 GB)


@dataclass
class HrpoRecipe(Schema):
    command: ClassVar[str] = "train hrpo"
    # pretrained: LoRA (GRPO moves the policy; the thinking residual alone cannot), and a one-line instruction with
    # an example: SmolLM2-135M ends 4% of its answers with '#### n' when told to think step by step, 81% with it
    backbone_defaults: ClassVar[dict] = {
        "tiny": {"training": {"max_steps": 60, "batch_size": 4, "backbone_lr": 1e-4, "max_completion_length": 32},
                 "dataset": {"instruction": STEP_BY_STEP}},
        "pretrained": {"method": "lora",
                       "training": {"max_steps": 60, "batch_size": 4, "backbone_lr": 1e-4, "max_completion_length": 64},
                       "dataset": {"instruction": ONE_LINE}},
    }
    model: HrpoModelSection = field(default_factory=HrpoModelSection)
    dataset: HrpoDataset = field(default_factory=HrpoDataset)
    training: HrpoTraining = field(default_factory=lambda: HrpoTraining(
        epochs=1, eval_interval=0, eval_num_samples=50, lr_scheduler=Scheduler.constant, warmup_ratio=0.0))
    logging: LoggingSection = field(default_factory=lambda: LoggingSection(log_interval=10))

    def validate(self) -> None:
        t = self.training
        for key, val, ok in (("training.group_size", t.group_size, t.group_size >= 2),
                             ("training.temperature", t.temperature, t.temperature > 0),
                             ("training.max_completion_length", t.max_completion_length, t.max_completion_length >= 1),
                             ("training.beta", t.beta, t.beta >= 0)):
            if not ok:
                want = ">= 2" if key.endswith("size") else "a positive value"
                raise MemcliError(f"key '{key}' got {val}, expected {want}")


RECIPES = {"router": RouterRecipe, "fusion": FusionRecipe, "memory": MemoryRecipe, "hippo": HippoRecipe,
           "hrpo": HrpoRecipe}

# names a user may bring from another recipe or a seed: the key that means the same thing here
_SAME_MEANING = {
    "dataset.train_path": ("dataset.sft_dataset_path",),
    "dataset.sft_dataset_path": ("dataset.train_path",),
    "dataset.eval_path": ("dataset.sft_val_dataset_path", "dataset.omcq_eval_path"),
    "dataset.sft_val_dataset_path": ("dataset.eval_path",),
    "dataset.max_length": ("dataset.max_prompt_length",),
    "training.memory_lr": ("training.learning_rate",),
    "training.hippo_lr": ("training.learning_rate",),
    "training.learning_rate": ("training.backbone_lr",),
}


# --------------------------------------------------------------------------- loading


def valid_keys(schema: Any) -> list[str]:
    """Dotted leaf keys of a recipe schema (class or instance)."""
    out = []
    obj = schema() if isinstance(schema, type) else schema
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v):
            out.extend(f"{f.name}.{k}" for k in valid_keys(v))
        else:
            out.append(f.name)
    return out


def _suggest(key: str, schema: Any) -> str:
    keys = valid_keys(schema)
    for alt in _SAME_MEANING.get(key, ()):
        if alt in keys:
            return f"; did you mean '{alt}'?"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # also try the last component alone (e.g. "learnin_rate" without a section)
        leaf = key.split(".")[-1]
        by_leaf = {k.split(".")[-1]: k for k in keys}
        m = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[m[0]]] if m else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _explain(e: OmegaConfBaseException, source: str, schema: Any) -> MemcliError:
    key = getattr(e, "full_key", None) or ""
    cmd = getattr(schema, "command", "this command")
    if isinstance(e, ConfigKeyError) or "not in" in str(e) or "Key '" in str(e) and "not" in str(e):
        return MemcliError(f"{source}: unknown key '{key}' for {cmd}{_suggest(key, schema)}")
    if isinstance(e, ValidationError):
        msg = str(e).splitlines()[0]
        want = msg.split("converted to ")[-1] if "converted to" in msg else msg
        val = getattr(e, "value", None) if hasattr(e, "value") else None
        if "expected one of" in msg:  # an enum: list the choices
            want = "one of " + msg.split("expected one of")[-1].strip(" []").replace("[", "").replace("]", "")
        return MemcliError(f"{source}: key '{key}' got {val!r}, expected {want.strip().lower()}")
    return MemcliError(f"{source}: {str(e).splitlines()[0]} (key '{key}')")


def parse_overrides(overrides: Sequence[str]) -> list[str]:
    out = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise MemcliError(f"override '{item}': expected key=value (for example training.learning_rate=3e-4)")
        out.append(item)
    return out


def load_config(recipe: str | type, config_file: str | Path | None = None, overrides: Sequence[str] = (),
                resolved: bool = True):
    """Schema defaults <- YAML ``config_file`` <- ``key=value`` overrides, then per-backbone defaults."""
    schema = RECIPES[recipe] if isinstance(recipe, str) else recipe
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    layers: list[tuple[str, Any]] = []
    if config_file is not None:
        layers.append((str(config_file), OmegaConf.create(_read_yaml(Path(config_file)))))
    for item in parse_overrides(overrides):
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
    return resolve(obj) if resolved else obj


def _read_yaml(p: Path) -> dict:
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
        return {}
    if not isinstance(data, dict):
        raise MemcliError(f"{p}: top level is {type(data).__name__}, expected a mapping of sections")
    return data


# --------------------------------------------------------------------------- resolution


def backbone_spec(cfg: Any) -> str:
    """``model.qwen3_model_path`` (the seeds' name) wins over ``model.backbone`` when set."""
    m = cfg.model
    if m.qwen3_model_path and m.backbone not in ("tiny", m.qwen3_model_path):
        raise MemcliError(f"model.qwen3_model_path={m.qwen3_model_path} and model.backbone={m.backbone} name two "
                          "backbones; set one of them")
    return m.qwen3_model_path or m.backbone


def backbone_kind(spec: str) -> str:
    return "tiny" if spec == "tiny" else "pretrained"


def resolve(cfg: Any) -> Any:
    """Fill the ``None`` keys that depend on the backbone (idempotent) and check values; returns ``cfg``."""
    cfg.resolve()
    return cfg


def _resolve(c: Schema) -> Schema:
    spec = backbone_spec(c)
    kind = backbone_kind(spec)
    for sec, vals in type(c).backbone_defaults.get(kind, {}).items():
        if sec == "method":
            continue
        s = getattr(c, sec)
        for k, v in vals.items():
            if hasattr(s, k) and getattr(s, k) is None:
                setattr(s, k, _coerce(s, k, v))
    m = c.model
    if getattr(m, "finetuning_method", None) == Method.auto:
        chosen = type(c).backbone_defaults.get(kind, {}).get("method")
        m.finetuning_method = Method(chosen) if chosen else (Method.full if kind == "tiny" else Method.frozen)
    ds = c.dataset
    if hasattr(ds, "data_dir") and ds.data_dir is None:
        ds.data_dir = default_data_dir(spec)
    if isinstance(c, HippoRecipe):
        if m.hippo_variant == Variant.matrix and m.hippo_value_dim is None:
            m.hippo_value_dim = 64
        if m.hippo_variant == Variant.selective and m.hippo_expand is None:
            m.hippo_expand = 2
    _check_values(c)
    return c


def _coerce(section: Any, name: str, v):
    """A per-backbone default as the field's type (an enum field takes its enum)."""
    hint = typing.get_type_hints(type(section))[name]
    for arg in (hint, *typing.get_args(hint)):
        if isinstance(arg, type) and issubclass(arg, Enum):
            return arg(v)
    return list(v) if isinstance(v, list) else v


def default_data_dir(spec: str) -> str:
    """``data/default`` for tiny; ``data/<backbone name>`` for a pretrained backbone (its tokenizer's bank)."""
    if spec == "tiny":
        return "data/default"
    name = Path(spec).name if ("/" in spec or spec.endswith(".gguf")) else spec
    name = re.sub(r"\.gguf$", "", name)
    return "data/" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "backbone")


def _check_values(c: Any) -> None:
    lg = c.logging
    name = lg.run_name
    # the run directory is out_dir/run_name: a name may not climb out of out_dir or hide as a dot-directory
    if name is not None and (not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*", str(name)) or len(str(name)) > 128):
        raise MemcliError(f"key 'logging.run_name' got {name!r}, expected a plain directory name (letters, digits, "
                          "'_', '-', '.', no path separators)")
    m, t = c.model, c.training
    kn = getattr(m, "knowledge_num", None)
    if kn is not None and not (kn > 0 and math.isqrt(kn) ** 2 == kn):
        raise MemcliError(f"key 'model.knowledge_num' got {kn}, expected a perfect square (product keys use "
                          "sqrt(knowledge_num) keys per half), e.g. 1024 or 1048576")
    for k in ("batch_size", "accumulation_steps", "epochs", "dist_timeout_s"):
        v = getattr(t, k, 1)
        if v is not None and v < 1:
            raise MemcliError(f"key 'training.{k}' got {v}, expected a positive integer")
    zs = getattr(t, "zero_stage", 0)
    if zs not in (0, 1, 2, 3):
        raise MemcliError(f"key 'training.zero_stage' got {zs}, expected one of 0, 1, 2, 3")
    for k in ("learning_rate", "backbone_lr", "gate_lr", "lambda_lr", "projection_lr"):
        v = getattr(t, k, None)
        if v is not None and not v > 0:
            raise MemcliError(f"key 'training.{k}' got {v}, expected a positive number")
    for k in ("counterfactual_prob", "freeze_ratio"):
        if hasattr(t, k) and not 0.0 <= getattr(t, k) <= 1.0:
            raise MemcliError(f"key 'training.{k}' got {getattr(t, k)}, expected a value in [0, 1]")
    if getattr(m, "prefix_entries", 1) < 1:
        raise MemcliError(f"key 'model.prefix_entries' got {m.prefix_entries}, expected a positive integer")
    if getattr(m, "read", None) == Read.prefix and len(m.memory_layers) != 1:
        raise MemcliError(f"key 'model.memory_layers' got {m.memory_layers}: model.read=prefix retrieves at one "
                          "layer, expected a list of one layer index")
    if getattr(m, "hippo_variant", None) == Variant.selective and m.hippo_value_dim is not None:
        raise MemcliError("key 'model.hippo_value_dim' applies to hippo_variant=matrix; the selective encoder's "
                          "values are expand * hidden / heads wide (set model.hippo_expand)")
    if getattr(m, "hippo_variant", None) == Variant.matrix and m.hippo_expand is not None:
        raise MemcliError("key 'model.hippo_expand' applies to hippo_variant=selective; the matrix encoder's "
                          "values are model.hippo_value_dim wide")


# --------------------------------------------------------------------------- model configs of the kinds


@dataclass
class ModelConfig:
    """Base of each kind's model config (``memcli/<kind>/config.py``), saved as JSON beside the kind's weights.

    Its field names are the recipe schema's ``model`` keys (no renaming on the way); ``LEGACY`` maps names that
    configs saved by older releases used, so their runs keep loading."""

    LEGACY: ClassVar[dict] = {}

    def check(self, where: str) -> None:
        """Values the schema's enums and checks cannot see (a config loaded from a file)."""

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str):
        d = {cls.LEGACY.get(k, k): v for k, v in d.items()}
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise MemcliError(f"{where}: unknown field '{unknown[0]}'")
        try:
            cfg = cls(**d)
        except TypeError as e:
            raise MemcliError(f"{where}: {e}") from None
        cfg.check(where)
        return cfg


def model_fields(cls: type, section: Any, **given) -> dict:
    """The values of a model config ``cls`` taken from a recipe's ``model`` section, by the same names (enums as their
    values; keys the section leaves unset keep the config's default), then ``given`` (what the backbone decides)."""
    out = {}
    for f in fields(cls):
        if f.name in given:
            out[f.name] = given[f.name]
            continue
        v = getattr(section, f.name, None)
        if v is not None:
            out[f.name] = v.value if isinstance(v, Enum) else (list(v) if isinstance(v, (list, tuple)) else v)
    return out


# --------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (enums as their names), the form saved as config.yaml."""
    return cfg.to_dict()


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# keys that may differ between a run and its resumption: they change how it is watched, not what it computes
RESUME_MAY_CHANGE = ("logging.out_dir", "logging.run_name", "training.resume", "training.eval_interval", "training.eval_num_samples",
                     "training.final_eval_num_samples", "training.save_interval", "training.on_nonfinite",
                     "training.max_skipped_steps", "training.dist_timeout_s", "logging.log_interval",
                     "logging.tensorboard", "logging.wandb", "logging.swanlab")


def resume_conflict(saved: dict, now: dict) -> str | None:
    """The first key (dotted) whose value differs between a saved run config and this one, if any."""
    a, b = flat(saved), flat(now)
    for k in sorted(set(a) | set(b)):
        if k in RESUME_MAY_CHANGE:
            continue
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            return f"{k}: {a.get(k, '<absent>')!r} in the run, {b.get(k, '<absent>')!r} now"
    return None
