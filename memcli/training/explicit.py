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
from memcli.backbone import resolve as resolve_backbone
from memcli.checkpoint import load_tensors, save_tensors
from memcli.config import MemoryRecipe, Method, backbone_kind, backbone_spec, default_data_dir, resolve
from memcli.console import err_console
from memcli.errors import MemcliError
from memcli.eval.explicit import MODES, accuracy, evaluate, load_eval_data, questions, text_perplexity
from memcli.explicit import items as X
from memcli.explicit.ema import EmaAccumulator, ema_update, frozen_rows
from memcli.explicit.io import build_model, save_memory
from memcli.records import atomic_dir, read_json_object, write_json
from memcli.training.loop import TrainTask, run_training
from memcli.training.state import trainable_io

STAGES = ("router", "fusion", "memory")


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


def train_explicit(cfg, stage: str) -> dict:
    if stage not in STAGES:
        raise MemcliError(f"unknown stage '{stage}', expected one of {', '.join(STAGES)}")
    resolve(cfg)
    t, m, ds = cfg.training, cfg.model, cfg.dataset
    spec = backbone_spec(cfg)
    resolve_backbone(spec)  # an unknown or broken backbone fails before any data work
    method = getattr(m, "finetuning_method", Method.frozen).value  # router and fusion never train the backbone
    # the stages share one gate: router and fusion build the read the memory stage of this backbone uses
    read = m.read.value if hasattr(m, "read") else ("additive" if stage == "fusion" else
                                                    MemoryRecipe.backbone_defaults[backbone_kind(spec)]["model"]["read"])
    query, entry_key = m.query.value, m.entry_key.value
    if read == "prefix" and method == "full":
        raise MemcliError("model.read=prefix retrieves with the base model's states and cannot train the whole "
                          "backbone; use model.finetuning_method=lora (or frozen)")
    if entry_key == "hidden" and method == "full":
        raise MemcliError("model.entry_key=hidden takes keys from the base model's states, which must stay fixed; "
                          "use model.finetuning_method=lora or frozen (or entry_key=embeddings)")
    if read == "additive" and query == "mean" and method != "frozen":
        raise MemcliError("model.query=mean with read=additive needs finetuning_method=frozen (the running mean is "
                          "taken over the states of the backbone being trained)")
    torch.manual_seed(t.seed)
    paths = resolve_paths(cfg, spec, m.memory_layers[0])
    mem, tok, bank = build_model(spec, paths["cache"], paths["keys"], m.memory_layers, m.num_candidates,
                                 m.topk_per_half, m.gate_rank, getattr(m, "fusion_rank", 0), m.freeze_keys, method,
                                 t.seed, m.rerank, m.retrieval.value, trust_remote_code=m.trust_remote_code,
                                 query=query, entry_key=entry_key, read=read,
                                 prefix_entries=getattr(m, "prefix_entries", 1))
    # the cache and keys decide these sizes; a value given in the config is a statement about them, so check it
    for key, want, got, src in (("knowledge_num", m.knowledge_num, bank.knowledge_num, paths["cache"]),
                                ("knowledge_length", m.knowledge_length, bank.knowledge_length, paths["cache"]),
                                ("knowledge_dim", m.knowledge_dim, mem.cfg.knowledge_dim, paths["keys"])):
        if want is not None and want != got:
            raise MemcliError(f"key 'model.{key}' got {want}, but {src} holds {got} (leave it unset to take it from there)")
    router_path = getattr(ds, "pretrained_router_path", None)
    if router_path:
        load_router(mem, router_path)
    elif stage == "fusion":
        raise MemcliError("train fusion needs dataset.pretrained_router_path (the output of 'memcli train router')")
    fusion_path = getattr(ds, "pretrained_fusion_path", None)
    if fusion_path:  # ExplicitLM's chain router -> fusion -> memory: the fusion stage's weights, strictly
        load_fusion(mem, fusion_path)

    # ---- what trains
    for p in mem.backbone.parameters():
        p.requires_grad_(method == "full")
    if method == "lora":
        from memcli.backbone import apply_lora

        mem.backbone = apply_lora(mem.backbone, m.lora_rank, m.lora_alpha, m.lora_dropout)
    gate_params = [p for g in mem.gates.values() for p in g.parameters()]
    fuse_params = [p for mod in (mem.mem_norms, mem.fusions) for p in mod.parameters()]
    coefs = {"router": 1.0} if stage == "router" else {}
    if stage == "memory":
        coefs = {"router": t.router_loss_coef, "balance": t.balance_loss_coef, "similarity": t.similarity_loss_coef,
                 "diversity": t.diversity_loss_coef, "balance_form": t.balance_form.value}
    for p in gate_params:
        p.requires_grad_(stage != "fusion")
    for g in mem.gates.values():
        # exact retrieval never reads the product keys; only the key losses would train them
        used = g.retrieval == "product" or bool(coefs.get("similarity") or coefs.get("diversity"))
        g.keys.requires_grad_(stage != "fusion" and not m.freeze_keys and used)
    for p in fuse_params:
        p.requires_grad_(stage != "router")
    groups = [
        {"name": "gate", "params": [p for p in gate_params if p.requires_grad], "lr": t.learning_rate},
        {"name": "fusion", "params": [p for p in fuse_params if p.requires_grad], "lr": t.learning_rate},
        {"name": "backbone", "params": [p for p in mem.backbone.parameters() if p.requires_grad],
         "lr": getattr(t, "backbone_lr", None) or t.learning_rate},
    ]

    # ---- data
    fmt = ds.answer_format.value
    text_path = getattr(ds, "text_path", None)
    val_texts: list = []
    if text_path:  # MiniMind-style pretraining: next-token loss over raw texts, the memory read along the way
        if read != "additive":
            raise MemcliError("dataset.text_path (language-model pretraining) needs model.read=additive")
        items = X.load_texts(tok, text_path, ds.max_text_length)
        if ds.text_val_path:
            val_texts = X.load_texts(tok, ds.text_val_path, ds.max_text_length)
        else:  # the last 5% of the texts are held out
            cut = max(1, len(items) // 20)
            items, val_texts = items[:-cut], items[-cut:]
        omcq_eval, val_items, omcq_train = [], [], []
        coefs["router"] = 0.0  # raw text has no labelled entries
        cf_prob = 0.0
    else:
        items = X.load_items(tok, bank, paths["sft"], paths["labeled"], ds.max_prompt_length, fmt)
        if not items:
            raise MemcliError(f"{paths['sft']}: no conversation has an entry to ask in the {fmt} format "
                              "(dataset.answer_format)")
        omcq_eval, val_items = load_eval_data(tok, bank, paths["omcq_eval"], paths["sft_val"], paths["val_labeled"],
                                              ds.max_prompt_length, fmt)
        if stage == "router":
            omcq_eval = []  # the router stage is measured by recall alone
        omcq_train = records.read_json_list(paths["omcq_train"], records.OMCQ) if paths["omcq_train"].is_file() else []
        cf_prob = t.counterfactual_prob if stage == "memory" else 0.0
    prefix = read == "prefix"
    feats = None
    if prefix:  # the base model is fixed for retrieval: every prompt's query features once
        from memcli.backbone import left_pad

        err_console.print(f"read=prefix: caching the layer-{m.memory_layers[0]} features of {len(items)} training prompts")
        ids, att = left_pad([it.prompt_ids for it in items], tok.pad_token_id)
        feats = mem.prompt_features(ids, att)
        if query == "mean" and not router_path:  # a loaded router brings the statistics it was trained with
            mem.gates[str(m.memory_layers[0])].norm.fit(feats)
    lm_trains = method != "frozen" or (stage != "router" and read == "additive")

    ema = None
    ema_freq = getattr(t, "ema_update_freq", 0)
    if ema_freq:
        if prefix:
            raise MemcliError("training.ema_update_freq needs model.read=additive (EMA moves entries toward the hidden "
                              "states that read them)")
        ema = EmaAccumulator(mem.cfg.knowledge_num, mem.cfg.hidden_size)
        ema_decay, frozen = t.ema_decay, frozen_rows(mem.cfg.knowledge_num, t.freeze_ratio, t.seed)

    def step_fn(model, batch, step):
        if "override_rows" in batch:
            mem.set_override(batch["override_rows"], batch["override_ids"])
        mets = {}
        if prefix:
            rec = mem.retrieve(feats[batch["item_index"].cpu()].to(mem.bank.device))
            recs = [rec]
            lm = torch.zeros((), device=mem.bank.device)
            if lm_trains:
                lm = X.tail_lm_loss(model, batch, rows=rec["cells"][:, : mem.cfg.prefix_entries].detach())
                mets["lm"] = lm.detach()
        elif text_path:
            lm = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                       collect=True).loss
            recs = mem.ctx["records"]
            mets["lm"] = lm.detach()
        else:
            lm = X.tail_lm_loss(model, batch)
            recs = mem.ctx["records"]
            mets["lm"] = lm.detach()
        mem.set_override(None)
        extra, more = X.memory_losses(mem, batch, recs, coefs)
        mets.update(more)
        if stage == "router":
            lm = lm.detach() * 0  # the router stage trains on the router loss alone
        mem.update_usage(recs)
        if ema is not None:
            for r in recs:
                ema.add(r["cells"].detach(), r["weights"].detach(), r["h"].detach(), r["mask"])
        mem.ctx["records"] = []
        return lm + extra, mets

    usage_base = [mem.usage.detach().clone()]  # usage as of the start (or resume) of this run

    def sync_state():
        # DDP ranks count usage on their own shard of each batch: sum the increments since the last sync
        if _world() > 1:
            delta = mem.usage - usage_base[0]
            torch.distributed.all_reduce(delta)
            mem.usage.copy_(usage_base[0] + delta)
        usage_base[0] = mem.usage.detach().clone()

    def after_step(step):
        if ema is not None and step % ema_freq == 0:
            if _world() > 1:  # every rank applies the same update from the statistics of the global batch
                ema.all_reduce()
            head = mem.backbone.get_output_embeddings().weight.detach()
            rows = ema_update(mem.bank, mem.embed_weight().detach(), head, ema, ema_decay,
                              frozen.to(mem.bank.device), mem.cfg.pad_id)
            mem.last_updated[rows] = step
            mem.refresh_entry_features(rows)

    eval_n = t.eval_num_samples
    final_n = t.final_eval_num_samples  # None slices everything
    modes_during = tuple(md for md in MODES if not md.startswith("context"))  # in-context ceilings do not move while training

    def eval_fn(step):
        if text_path:
            return text_perplexity(mem, val_texts[:eval_n] if eval_n else val_texts, tok.pad_token_id)
        return evaluate(mem, tok, bank, omcq_eval[:eval_n] if eval_n else omcq_eval,
                        val_items[:eval_n] if eval_n else val_items, fmt, modes=modes_during)

    def final_eval(step):
        if text_path:
            return text_perplexity(mem, val_texts[:final_n], tok.pad_token_id)
        other = "letter" if fmt == "cloze" else "cloze"
        res = evaluate(mem, tok, bank, omcq_eval[:final_n], val_items[:final_n], fmt, formats=(fmt, other) if omcq_eval else None)
        if omcq_train and stage == "memory":
            n_train = min(200, final_n) if final_n is not None else 200
            res["train_facts_memory_on"] = accuracy(mem, tok, questions(tok, bank, omcq_train[:n_train], fmt), "on",
                                                    desc="train facts (on)")
        return res

    trainable_state, load_trainable = trainable_io({n: p for n, p in mem.named_parameters() if p.requires_grad})

    def extra_state():
        return {"bank": mem.bank.cpu(), "usage": mem.usage.cpu(), "last_updated": mem.last_updated.cpu()}

    def load_extra(sd):
        if "bank" in sd:
            mem.bank.copy_(sd["bank"])
            mem.usage.copy_(sd["usage"])
            mem.last_updated.copy_(sd["last_updated"])
            usage_base[0] = mem.usage.detach().clone()
            mem.refresh_entry_features()

    run_dir = Path(cfg.logging.out_dir) / (cfg.logging.run_name or stage)

    def save_fn(out, info):
        save_memory(mem, tok, bank, out, dict(info, stage=stage, answer_format=fmt, data_dir=str(ds.data_dir),
                                              **({"text_path": str(text_path)} if text_path else {})),
                    extra_parts=(lambda d: save_router(mem, d / "router")) if stage == "router" else None)

    has_eval = bool(omcq_eval or val_items or val_texts)
    task = TrainTask(
        model=mem, param_groups=groups, train_items=items,
        collate=(lambda its, micro: X.text_collate(its, tok.pad_token_id)) if text_path else
        (lambda its, micro: X.collate(its, tok.pad_token_id, t.seed * 1_000_003 + micro, cf_prob)),
        step_fn=step_fn, trainable_state=trainable_state, load_trainable=load_trainable, save_fn=save_fn,
        eval_fn=eval_fn if has_eval else None, final_eval_fn=final_eval if has_eval else None,
        after_step=after_step, extra_state=extra_state, load_extra_state=load_extra, sync_state=sync_state,
        info={"kind": "explicit-memory"},
    )
    return run_training(cfg, task, run_dir, f"train {stage}")


def _world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


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

    d, info = rundir.require_kind(path, "explicit-memory")
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
