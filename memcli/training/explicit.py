"""``memcli train router|fusion|memory``: ExplicitLM's stages on the shared loop (seed defects fixed).

- router: only the MemoryGate trains, on the router loss toward labelled entries;
- fusion: the gate is loaded strictly from the router stage and frozen; fusion + MemoryNorm train on
  the LM loss (the additive read);
- memory: every memory component (and the backbone when LoRA / full) on the LM loss of the answer
  + ``router_loss_coef`` * router loss + balance / similarity / diversity terms, with counterfactual
  memory augmentation (``counterfactual_prob``): an entry's object is rewritten in a batch-local copy
  of the bank and the target follows it, so answers cannot come from the weights.

With ``read=prefix`` (the pretrained-backbone recipe) retrieval runs on the base model's prompt
features, which are computed once and cached: the router trains on them at almost no cost per step,
and the LM loss (LoRA) teaches the model to read the entries placed before its prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from memcli import records
from memcli.backbone import apply_lora, left_pad
from memcli.backbone import resolve as resolve_backbone
from memcli.checkpoint import load_tensors, save_tensors
from memcli.config import RECIPES as SCHEMAS
from memcli.config import Method, Read, backbone_kind, backbone_spec, default_data_dir, model_fields
from memcli.console import err_console
from memcli.data.forms import load_forms
from memcli.errors import MemcliError
from memcli.eval.explicit import MODES, accuracy, evaluate, load_eval_data, questions, text_perplexity
from memcli.explicit import items as X
from memcli.explicit.config import MemoryConfig
from memcli.explicit.ema import EmaAccumulator, ema_update, frozen_rows
from memcli.explicit.io import build_model, save_memory
from memcli.kinds import EXPLICIT
from memcli.records import atomic_dir, read_json_object, write_json
from memcli.training.loop import train
from memcli.training.recipe import Recipe


def resolve_paths(cfg, spec: str, layer: int) -> dict:
    """Fill unset data paths from ``dataset.data_dir``; build the backbone's default data when it is absent."""
    d = Path(cfg.dataset.data_dir)
    m, ds = cfg.model, cfg.dataset
    keys = Path(m.keys_path) if m.keys_path else d / "keys"
    paths = {
        "cache": Path(m.cache_path) if m.cache_path else d / "cache",
        "keys": keys,
        "sft": Path(ds.sft_dataset_path) if ds.sft_dataset_path else d / "sft_train.jsonl",
        "sft_val": Path(ds.sft_val_dataset_path) if ds.sft_val_dataset_path else d / "sft_val.jsonl",
        "labeled": Path(ds.labeled_path) if ds.labeled_path else keys / "train_labeled.jsonl",
        "omcq_eval": Path(getattr(ds, "omcq_eval_path", None) or d / "omcq_val.json"),
        "omcq_train": d / "omcq_train.json",
    }
    paths["val_labeled"] = paths["labeled"].parent / "val_labeled.jsonl"
    explicit = any([m.cache_path, m.keys_path, ds.sft_dataset_path])
    if d.exists() and not d.is_dir():
        raise MemcliError(f"dataset.data_dir={d}: expected a data directory, found a file")
    if not explicit and not (paths["cache"].exists() and paths["keys"].exists()):
        # only the backbone's own default is generated on the fly; any other path missing its data is a typo or a
        # half-built directory, and training on freshly generated facts there would hide it
        if Path(default_data_dir(spec)) != d or (d.exists() and any(d.iterdir())):
            missing = [k for k in ("cache", "keys") if not paths[k].exists()]
            raise MemcliError(f"dataset.data_dir={d}: no {' or '.join(p + '/' for p in missing)} there (expected the "
                              f"output of 'memcli gen-data default --out {d}' or build-cache + build-keys)")
        from memcli.data.pipeline import default_data, default_source

        src = default_source(spec)
        err_console.print(f"no data in {d}: generating the default for backbone '{spec}' ({src} facts; gen-data -> "
                          "convert-omcq -> build-cache -> build-keys)")
        default_data(d, seed=0, source=src, backbone=spec, layer=layer if backbone_kind(spec) != "tiny" else None)
    return paths


class _ExplicitRecipe(Recipe):
    """What router, fusion, memory and text pretraining share; each stage is a subclass that says what trains."""

    kind = EXPLICIT
    stage = ""  # recorded in checkpoint.json; the default run name

    def __init__(self, cfg):
        super().__init__(cfg)
        self.command, self.default_run_name = f"train {self.stage}", self.stage

    # ---- what differs between the stages
    def read(self) -> str:
        return self.cfg.model.read.value

    def method(self) -> str:
        return Method.frozen.value  # router and fusion never train the backbone

    def coefs(self) -> dict:
        """Weights of the memory losses (memcli.explicit.items.memory_losses)."""
        return {}

    def load_parts(self) -> None:
        """Weights of an earlier stage, strictly."""

    def trains(self) -> tuple[bool, bool]:
        """(gate, fusion + MemoryNorm)"""
        return True, True

    def counterfactual_prob(self) -> float:
        return 0.0

    def combine(self, lm: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return lm + extra

    # ---- build
    def build_model(self) -> None:
        cfg, m, t = self.cfg, self.cfg.model, self.cfg.training
        spec = backbone_spec(cfg)
        resolve_backbone(spec)  # an unknown or broken backbone fails before any data work
        torch.manual_seed(t.seed)
        self.paths = resolve_paths(cfg, spec, m.memory_layers[0])
        fields = model_fields(MemoryConfig, m, read=self.read(), finetuning_method=self.method(), backbone=spec)
        self.mem, self.tok, self.bank = build_model(cache_path=self.paths["cache"], keys_path=self.paths["keys"],
                                                    seed=t.seed, trust_remote_code=m.trust_remote_code, **fields)
        check_sizes(m, self.mem, self.bank, self.paths)
        self.load_parts()
        self.model = self.mem
        self.param_groups = trainable_groups(self.mem, self.method(), *self.trains(), self.coefs(), cfg)

    def build_data(self) -> None:
        ds, mem, tok = self.cfg.dataset, self.mem, self.tok
        fmt = ds.answer_format.value
        forms = load_forms() if ds.paraphrases else None  # the LPAQA templates and questions shipped with memcli
        self.train_items = X.load_items(tok, self.bank, self.paths["sft"], self.paths["labeled"], ds.max_prompt_length,
                                        fmt, forms=forms)
        if not self.train_items:
            raise MemcliError(f"{self.paths['sft']}: no conversation has an entry to ask in the {fmt} format "
                              "(dataset.answer_format)")
        self.omcq_eval, self.val_items = load_eval_data(tok, self.bank, self.paths["omcq_eval"], self.paths["sft_val"],
                                                        self.paths["val_labeled"], ds.max_prompt_length, fmt)
        self.feats = None
        if self.read() == "prefix":  # the base model is fixed for retrieval: every prompt's query features once
            layer = mem.cfg.memory_layers[0]
            err_console.print(f"read=prefix: caching the layer-{layer} features of {len(self.train_items)} training "
                              "prompts")
            ids, att = left_pad([it.prompt_ids for it in self.train_items], tok.pad_token_id)
            self.feats = mem.prompt_features(ids, att)
            if mem.cfg.query == "mean" and not getattr(ds, "pretrained_router_path", None):
                mem.gates[str(layer)].norm.fit(self.feats)  # a loaded router brings the statistics it was trained with
        self.usage_base = mem.usage.detach().clone()  # usage as of the start (or resume) of this run

    # ---- train
    def collate(self, items: list, micro: int) -> dict:
        t = self.cfg.training
        return X.collate(items, self.tok.pad_token_id, t.seed * 1_000_003 + micro, self.counterfactual_prob())

    def forward(self, model, batch: dict) -> tuple[torch.Tensor, list[dict], dict]:
        """-> (LM loss on the answer, the memory's records, metrics)."""
        mem = self.mem
        if self.feats is None:  # additive read: the records come from the layers' hooks in the same forward
            lm, recs = X.tail_lm_loss(model, batch)
            return lm, recs, {"lm": lm.detach()}
        rec = mem.retrieve(self.feats[batch["item_index"].cpu()].to(mem.bank.device))
        if self.method() == "frozen":  # a prefix read has no memory weights for the LM loss to train
            return torch.zeros((), device=mem.bank.device), [rec], {}
        lm, _ = X.tail_lm_loss(model, batch, rows=rec["cells"][:, : mem.cfg.prefix_entries].detach())
        return lm, [rec], {"lm": lm.detach()}

    def step(self, model, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        mem = self.mem
        if "override_rows" in batch:
            mem.set_override(batch["override_rows"], batch["override_ids"])
        lm, recs, mets = self.forward(model, batch)
        mem.set_override(None)
        extra, more = X.memory_losses(mem, batch, recs, self.coefs())
        mets.update(more)
        mem.update_usage(recs)
        self.records_seen(recs)
        return self.combine(lm, extra), mets

    def records_seen(self, recs: list[dict]) -> None:
        pass

    def sync_state(self) -> None:
        # DDP ranks count usage on their own shard of each batch: sum the increments since the last sync
        mem = self.mem
        if self.sizes.world > 1:
            delta = mem.usage - self.usage_base
            torch.distributed.all_reduce(delta)
            mem.usage.copy_(self.usage_base + delta)
        self.usage_base = mem.usage.detach().clone()

    # ---- evaluate
    @property
    def has_eval(self) -> bool:
        return bool(self.omcq_eval or self.val_items)

    def evaluate(self, step: int, final: bool = False) -> dict:
        t, fmt = self.cfg.training, self.cfg.dataset.answer_format.value
        if final:
            n = self.final_n  # None slices everything
            other = "letter" if fmt == "cloze" else "cloze"
            both = self.omcq_eval and t.final_eval_other_format
            return evaluate(self.mem, self.tok, self.bank, self.omcq_eval[:n], self.val_items[:n], fmt,
                            formats=(fmt, other) if both else None)
        n = self.eval_n
        during = tuple(md for md in MODES if not md.startswith("context"))  # in-context ceilings do not move
        return evaluate(self.mem, self.tok, self.bank, self.omcq_eval[:n], self.val_items[:n], fmt, modes=during)

    # ---- state and save
    def extra_state(self) -> dict[str, torch.Tensor]:
        mem = self.mem
        return {"bank": mem.bank.cpu(), "usage": mem.usage.cpu(), "last_updated": mem.last_updated.cpu()}

    def load_extra_state(self, sd: dict[str, torch.Tensor]) -> None:
        if "bank" in sd:
            mem = self.mem
            mem.bank.copy_(sd["bank"])
            mem.usage.copy_(sd["usage"])
            mem.last_updated.copy_(sd["last_updated"])
            self.usage_base = mem.usage.detach().clone()
            mem.refresh_entry_features()

    def save(self, out: Path, info: dict) -> None:
        ds = self.cfg.dataset
        info = dict(info, stage=self.stage, answer_format=ds.answer_format.value, data_dir=str(ds.data_dir),
                    **self.saved_info())
        save_memory(self.mem, self.tok, self.bank, out, info, extra_parts=self.extra_parts)

    def saved_info(self) -> dict:
        return {}

    def extra_parts(self, run_dir: Path) -> None:
        """Parts a stage writes besides the memory's."""


class RouterRecipe(_ExplicitRecipe):
    """``train router``: only the MemoryGate, on the router loss toward the labelled entries."""

    stage = "router"

    def read(self) -> str:  # the read the memory stage of this backbone uses (the router schema has no such key)
        return SCHEMAS["memory"].backbone_defaults[backbone_kind(backbone_spec(self.cfg))]["model"]["read"]

    def coefs(self) -> dict:
        return {"router": 1.0}

    def trains(self) -> tuple[bool, bool]:
        return True, False

    def combine(self, lm, extra):
        return lm.detach() * 0 + extra  # the router stage trains on the router loss alone

    def build_data(self) -> None:
        super().build_data()
        self.omcq_eval = []  # the router stage is measured by recall alone

    def extra_parts(self, run_dir: Path) -> None:
        save_router(self.mem, run_dir / "router")


class FusionRecipe(_ExplicitRecipe):
    """``train fusion``: the gate loaded strictly from a router run and frozen; fusion + MemoryNorm on the LM loss."""

    stage = "fusion"

    def read(self) -> str:
        return Read.additive.value  # a fusion stage trains the additive read

    def trains(self) -> tuple[bool, bool]:
        return False, True

    def load_parts(self) -> None:
        load_router(self.mem, self.cfg.dataset.pretrained_router_path)


class MemoryRecipe(_ExplicitRecipe):
    """``train memory``: every memory part (and the backbone with LoRA / full) on the answer's LM loss + the memory
    losses, with counterfactual edits of the bank (``training.counterfactual_prob``)."""

    stage = "memory"

    def method(self) -> str:
        return self.cfg.model.finetuning_method.value

    def coefs(self) -> dict:
        t = self.cfg.training
        return {"router": t.router_loss_coef, "balance": t.balance_loss_coef, "similarity": t.similarity_loss_coef,
                "diversity": t.diversity_loss_coef, "balance_form": t.balance_form.value}

    def counterfactual_prob(self) -> float:
        return self.cfg.training.counterfactual_prob

    def load_parts(self) -> None:
        ds = self.cfg.dataset
        if ds.pretrained_router_path:
            load_router(self.mem, ds.pretrained_router_path)
        if ds.pretrained_fusion_path:  # ExplicitLM's chain router -> fusion -> memory: the fusion stage's weights
            load_fusion(self.mem, ds.pretrained_fusion_path)

    def build_data(self) -> None:
        super().build_data()
        p = self.paths["omcq_train"]
        self.omcq_train = records.read_json_list(p, records.OMCQ) if p.is_file() else []
        self._ema_setup()

    def _ema_setup(self) -> None:
        t, mem = self.cfg.training, self.mem
        self.ema = EmaAccumulator(mem.cfg.knowledge_num, mem.cfg.hidden_size) if t.ema_update_freq else None
        self.frozen = frozen_rows(mem.cfg.knowledge_num, t.freeze_ratio, t.seed) if t.ema_update_freq else None

    def records_seen(self, recs: list[dict]) -> None:
        if self.ema is not None:
            for r in recs:
                self.ema.add(r["cells"].detach(), r["weights"].detach(), r["h"].detach(), r["mask"])

    def after_step(self, step: int) -> None:
        """EMA updates of the bank's tokens (training.ema_update_freq), MiniMind's."""
        t, mem = self.cfg.training, self.mem
        if self.ema is None or step % t.ema_update_freq:
            return
        if self.sizes.world > 1:  # every rank applies the same update from the statistics of the global batch
            self.ema.all_reduce()
        head = mem.backbone.get_output_embeddings().weight.detach()
        rows = ema_update(mem.bank, mem.embed_weight().detach(), head, self.ema, t.ema_decay,
                          self.frozen.to(mem.bank.device), mem.cfg.pad_id)
        mem.last_updated[rows] = step
        mem.refresh_entry_features(rows)

    def evaluate(self, step: int, final: bool = False) -> dict:
        res = super().evaluate(step, final)
        if final and self.omcq_train:
            n = self.final_n
            fmt = self.cfg.dataset.answer_format.value
            qs = questions(self.tok, self.bank, self.omcq_train[:min(200, n) if n is not None else 200], fmt)
            res["train_facts_memory_on"] = accuracy(self.mem, self.tok, qs, "on", desc="train facts (on)")
        return res


class TextRecipe(MemoryRecipe):
    """``train memory dataset.text_path=FILE``: MiniMind-style pretraining, next-token loss over raw texts with the
    memory read along the way (no labelled entries: no router loss); optional EMA updates of the bank."""

    def coefs(self) -> dict:
        return dict(super().coefs(), router=0.0)  # raw text has no labelled entries

    def counterfactual_prob(self) -> float:
        return 0.0

    def build_data(self) -> None:
        ds, mem = self.cfg.dataset, self.mem
        self.train_items = X.load_texts(self.tok, ds.text_path, ds.max_text_length)
        if ds.text_val_path:
            self.val_texts = X.load_texts(self.tok, ds.text_val_path, ds.max_text_length)
        else:  # the last 5% of the texts are held out
            cut = max(1, len(self.train_items) // 20)
            self.train_items, self.val_texts = self.train_items[:-cut], self.train_items[-cut:]
        self.feats, self.omcq_eval, self.val_items, self.omcq_train = None, [], [], []
        self.usage_base = mem.usage.detach().clone()
        self._ema_setup()

    def collate(self, items: list, micro: int) -> dict:
        return X.text_collate(items, self.tok.pad_token_id)

    def forward(self, model, batch: dict) -> tuple[torch.Tensor, list[dict], dict]:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    collect=True)
        return out.loss, out.memory_records, {"lm": out.loss.detach()}

    @property
    def has_eval(self) -> bool:
        return bool(self.val_texts)

    def evaluate(self, step: int, final: bool = False) -> dict:
        n = self.final_n if final else self.eval_n
        return text_perplexity(self.mem, self.val_texts[:n], self.tok.pad_token_id)

    def saved_info(self) -> dict:
        return {"text_path": str(self.cfg.dataset.text_path)}


def memory_recipe(cfg) -> MemoryRecipe:
    """``train memory``: raw-text pretraining when ``dataset.text_path`` is set, else the question recipe."""
    return TextRecipe(cfg) if cfg.dataset.text_path else MemoryRecipe(cfg)


def train_explicit(cfg, stage: str) -> dict:
    """``memcli train router|fusion|memory`` from Python."""
    recipes = {"router": RouterRecipe, "fusion": FusionRecipe, "memory": memory_recipe}
    if stage not in recipes:
        raise MemcliError(f"unknown stage '{stage}', expected one of {', '.join(recipes)}")
    return train(recipes[stage](cfg))


def check_sizes(m, mem, bank, paths: dict) -> None:
    """The cache and keys decide the sizes; a value given in the config is a statement about them, so check it."""
    for key, want, got, src in (("knowledge_num", m.knowledge_num, bank.knowledge_num, paths["cache"]),
                                ("knowledge_length", m.knowledge_length, bank.knowledge_length, paths["cache"]),
                                ("knowledge_dim", m.knowledge_dim, mem.cfg.knowledge_dim, paths["keys"])):
        if want is not None and want != got:
            raise MemcliError(f"key 'model.{key}' got {want}, but {src} holds {got} (leave it unset to take it from "
                              "there)")


def trainable_groups(mem, method: str, gate: bool, fusion: bool, coefs: dict, cfg) -> list[dict]:
    """Set what trains (the backbone by ``method``; LoRA is applied here) -> the optimizer's parameter groups."""
    m, t = cfg.model, cfg.training
    for p in mem.backbone.parameters():
        p.requires_grad_(method == "full")
    if method == "lora":
        mem.backbone = apply_lora(mem.backbone, m.lora_rank, m.lora_alpha, m.lora_dropout)
    gate_params = [p for g in mem.gates.values() for p in g.parameters()]
    fuse_params = [p for mod in (mem.mem_norms, mem.fusions) for p in mod.parameters()]
    for p in gate_params:
        p.requires_grad_(gate)
    for g in mem.gates.values():
        # exact retrieval never reads the product keys; only the key losses would train them
        used = g.retrieval == "product" or bool(coefs.get("similarity") or coefs.get("diversity"))
        g.keys.requires_grad_(gate and not m.freeze_keys and used)
    for p in fuse_params:
        p.requires_grad_(fusion)
    return [
        {"name": "gate", "params": [p for p in gate_params if p.requires_grad], "lr": t.learning_rate},
        {"name": "fusion", "params": [p for p in fuse_params if p.requires_grad], "lr": t.learning_rate},
        {"name": "backbone", "params": [p for p in mem.backbone.parameters() if p.requires_grad],
         "lr": getattr(t, "backbone_lr", None) or t.learning_rate},
    ]


def save_router(mem, out: Path) -> None:
    with atomic_dir(out) as tmp:
        save_tensors(tmp / "router.safetensors", {f"{i}.{k}": v for i, g in mem.gates.items() for k, v in g.state_dict().items()})
        write_json(tmp / "router.json", {"memory_layers": mem.cfg.memory_layers, "knowledge_num": mem.cfg.knowledge_num,
                                         "knowledge_dim": mem.cfg.knowledge_dim, "index_id": mem.cfg.index_id,
                                         "query": mem.cfg.query, "entry_key": mem.cfg.entry_key})


def load_fusion(mem, path) -> None:
    """The fusion and MemoryNorm of a 'train fusion' run, loaded strictly (same layers, sizes and bank order)."""
    from memcli import rundir
    from memcli.explicit.io import MEMORY, memory_state_dict

    d, info = rundir.require_kind(path, EXPLICIT)
    if info.get("stage") != "fusion":
        raise MemcliError(f"{d}: a '{info.get('stage')}' run, expected the output of 'memcli train fusion' "
                          "(dataset.pretrained_fusion_path)")
    meta = read_json_object(d / MEMORY / "memory_config.json", "memory config")
    for k in ("memory_layers", "index_id", "hidden_size", "fusion_rank"):
        if meta.get(k) != getattr(mem.cfg, k):
            raise MemcliError(f"{d}: fusion run has {k}={meta.get(k)}, this config has {getattr(mem.cfg, k)}")
    if mem.cfg.read != "additive":
        raise MemcliError("dataset.pretrained_fusion_path needs model.read=additive (a fusion stage trains the "
                          "additive read)")
    sd = load_tensors(d / MEMORY / "memory.safetensors")
    own = memory_state_dict(mem)
    part = {k: v for k, v in sd.items() if k.startswith(("mem_norms.", "fusions."))}
    want = {k for k in own if k.startswith(("mem_norms.", "fusions."))}
    if set(part) != want or any(tuple(part[k].shape) != tuple(own[k].shape) for k in want):
        raise MemcliError(f"{d / MEMORY / 'memory.safetensors'}: fusion weights do not fit this config")
    with torch.no_grad():
        for name, mod in (("mem_norms", mem.mem_norms), ("fusions", mem.fusions)):
            mod.load_state_dict({k[len(name) + 1:]: v for k, v in part.items() if k.startswith(name + ".")}, strict=True)


def load_router(mem, path) -> None:
    """Strict: every gate tensor present with the right shape, same layers, index space and query / key kinds."""
    p = Path(path)
    if (p / "router").is_dir():
        p = p / "router"
    meta = read_json_object(p / "router.json", "router config")
    if meta.get("index_id") != mem.cfg.index_id:
        raise MemcliError(f"{p}: router was trained on another bank order (index_id {meta.get('index_id')} != {mem.cfg.index_id})")
    if list(meta.get("memory_layers", [])) != list(mem.cfg.memory_layers):
        raise MemcliError(f"{p}: router has memory layers {meta.get('memory_layers')}, config has {mem.cfg.memory_layers}")
    for k in ("query", "entry_key"):
        if meta.get(k, getattr(mem.cfg, k)) != getattr(mem.cfg, k):
            raise MemcliError(f"{p}: router was trained with model.{k}={meta.get(k)}, config has {getattr(mem.cfg, k)}")
    sd = load_tensors(p / "router.safetensors")
    for i, g in mem.gates.items():
        part = {k[len(i) + 1:]: v for k, v in sd.items() if k.split(".", 1)[0] == i}
        try:
            g.load_state_dict(part, strict=True)
        except RuntimeError as e:
            raise MemcliError(f"{p}/router.safetensors: does not fit gate of layer {i} ({str(e).splitlines()[0][:120]})") from None
