"""``memcli train router|fusion|memory``: assemble data, model and task, then run the shared loop."""

from __future__ import annotations

from pathlib import Path

import torch

from memcli import records
from memcli.checkpoint import load_tensors, save_tensors
from memcli.errors import MemcliError
from memcli.explicit import train as X
from memcli.explicit.ema import EmaAccumulator, ema_update, frozen_rows
from memcli.eval.explicit import evaluate, load_eval_data
from memcli.explicit.io import build_model, save_checkpoint
from memcli.training.loop import TrainTask, run_training
from memcli.training.state import trainable_io

STAGES = ("router", "fusion", "memory")


def resolve_paths(cfg) -> dict:
    """Fill unset data paths from ``dataset.data_dir``; build the synthetic default when it is absent."""
    d = Path(cfg.dataset.data_dir)
    m, ds = cfg.model, cfg.dataset
    paths = {
        "cache": Path(m.cache_path) if m.cache_path else d / "cache",
        "keys": Path(m.keys_path) if m.keys_path else d / "keys",
        "sft": Path(ds.sft_dataset_path) if ds.sft_dataset_path else d / "sft_train.jsonl",
        "sft_val": Path(ds.sft_val_dataset_path) if ds.sft_val_dataset_path else d / "sft_val.jsonl",
        "labeled": Path(ds.labeled_path) if ds.labeled_path else (Path(m.keys_path) if m.keys_path else d / "keys") / "train_labeled.jsonl",
        "omcq_eval": Path(ds.omcq_eval_path) if ds.omcq_eval_path else d / "omcq_val.json",
        "omcq_train": d / "omcq_train.json",
    }
    paths["val_labeled"] = paths["labeled"].parent / "val_labeled.jsonl"
    explicit = any([m.cache_path, m.keys_path, ds.sft_dataset_path])
    if d.exists() and not d.is_dir():
        raise MemcliError(f"dataset.data_dir={d}: expected a data directory, found a file")
    if not explicit and not (paths["cache"].exists() and paths["keys"].exists()):
        from memcli.config import DatasetConfig

        # only the built-in default is generated on the fly; any other path missing its data is a typo or a
        # half-built directory, and training on freshly invented facts there would hide it
        if Path(DatasetConfig.data_dir) != d or (d.exists() and any(d.iterdir())):
            missing = [k for k in ("cache", "keys") if not paths[k].exists()]
            raise MemcliError(f"dataset.data_dir={d}: no {' or '.join(p + '/' for p in missing)} there (expected the "
                              f"output of 'memcli gen-data default --out {d}' or build-cache + build-keys)")
        from memcli.data.pipeline import default_data
        from memcli.views import err_console

        err_console.print(f"no data in {d}: generating the synthetic default (gen-data -> convert-omcq -> build-cache -> build-keys)")
        default_data(d, seed=0)
    return paths


def backbone_spec(cfg) -> tuple[str, str]:
    spec = cfg.model.qwen3_model_path or cfg.model.backbone
    method = cfg.model.finetuning_method
    if method == "auto":
        method = "full" if spec == "tiny" else "frozen"  # tiny trains from scratch; a real Qwen3 stays frozen
    return spec, method


def train_explicit(cfg, stage: str) -> dict:
    if stage not in STAGES:
        raise MemcliError(f"unknown stage '{stage}', expected one of {', '.join(STAGES)}")
    t, m = cfg.training, cfg.model
    torch.manual_seed(t.seed)
    paths = resolve_paths(cfg)
    spec, method = backbone_spec(cfg)
    mem, tok, bank = build_model(spec, paths["cache"], paths["keys"], m.memory_layers, m.num_candidates,
                                 m.topk_per_half, m.gate_rank, m.fusion_rank, m.freeze_keys, method, t.seed,
                                 m.rerank, m.retrieval, trust_remote_code=m.trust_remote_code)
    # the cache and keys decide these sizes; a value given in the config is a statement about them, so check it
    for key, want, got, src in (("knowledge_num", m.knowledge_num, bank.knowledge_num, paths["cache"]),
                                ("knowledge_length", m.knowledge_length, bank.knowledge_length, paths["cache"]),
                                ("knowledge_dim", m.knowledge_dim, mem.cfg.knowledge_dim, paths["keys"])):
        if want is not None and want != got:
            raise MemcliError(f"key 'model.{key}' got {want}, but {src} holds {got} (leave it unset to take it from there)")
    if stage != "memory" and method != "frozen":
        method = "frozen"  # router and fusion stages never train the backbone
        mem.cfg.mode = "frozen"
    # the router checkpoint loads strictly into the gates of later stages
    if cfg.dataset.pretrained_router_path:
        load_router(mem, cfg.dataset.pretrained_router_path)
    elif stage == "fusion":
        raise MemcliError("train fusion needs dataset.pretrained_router_path (the output of 'memcli train router')")

    # ---- what trains
    for p in mem.backbone.parameters():
        p.requires_grad_(method == "full")
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        mem.backbone = get_peft_model(mem.backbone, lcfg)
    gate_params = [p for g in mem.gates.values() for p in g.parameters()]
    fuse_params = [p for mod in (mem.mem_norms, mem.fusions) for p in mod.parameters()]
    for p in gate_params:
        p.requires_grad_(stage != "fusion")
    for g in mem.gates.values():
        # exact retrieval never reads the product keys; only the key losses would train them
        used = g.retrieval == "product" or bool(t.similarity_loss_coef or t.diversity_loss_coef)
        g.keys.requires_grad_(stage != "fusion" and not m.freeze_keys and used)
    for p in fuse_params:
        p.requires_grad_(stage != "router")
    mem_lr = t.memory_lr or t.learning_rate
    groups = [
        {"name": "gate", "params": [p for p in gate_params if p.requires_grad], "lr": mem_lr},
        {"name": "fusion", "params": [p for p in fuse_params if p.requires_grad], "lr": mem_lr},
        {"name": "backbone", "params": [p for p in mem.backbone.parameters() if p.requires_grad],
         "lr": t.backbone_lr or t.learning_rate},
    ]

    # ---- data
    L = bank.knowledge_length
    items = X.load_items(tok, bank, paths["sft"], paths["labeled"], L, cfg.dataset.max_length)
    omcq_eval, val_items = load_eval_data(tok, bank, paths["omcq_eval"], paths["sft_val"], paths["val_labeled"],
                                          cfg.dataset.max_length)
    omcq_train = records.read_json_list(paths["omcq_train"], records.OMCQ) if paths["omcq_train"].is_file() else []
    cf_prob = t.counterfactual_prob if stage == "memory" else 0.0

    ema = EmaAccumulator(mem.cfg.knowledge_num, mem.cfg.hidden_size) if (t.ema_update_freq and stage == "memory") else None
    frozen = frozen_rows(mem.cfg.knowledge_num, t.freeze_ratio, t.seed)

    def step_fn(model, batch, step):
        if "override_rows" in batch:
            mem.ctx["bank_override"] = (batch["override_rows"], batch["override_ids"])
        lm = X.tail_lm_loss(model, batch)
        mem.ctx["bank_override"] = None
        extra, mets = X.memory_losses(mem, batch, cfg, stage)
        if stage == "router":
            lm = lm.detach() * 0  # the router stage trains on the router loss alone
        recs = mem.ctx["records"]
        mem.update_usage(recs)
        if ema is not None:
            for r in recs[:1]:
                ema.add(r["cells"].detach(), r["weights"].detach(), r["h"].detach(), r["mask"])
        mem.ctx["records"] = []
        return lm + extra, dict(mets, lm=lm.detach())

    usage_base = [mem.usage.detach().clone()]  # usage as of the start (or resume) of this run

    def sync_state():
        # DDP ranks count usage on their own shard of each batch: sum the increments since the last sync
        if _world() > 1:
            delta = mem.usage - usage_base[0]
            torch.distributed.all_reduce(delta)
            mem.usage.copy_(usage_base[0] + delta)
        usage_base[0] = mem.usage.detach().clone()

    def after_step(step):
        if ema is not None and step % t.ema_update_freq == 0:
            if _world() > 1:  # every rank applies the same update from the statistics of the global batch
                torch.distributed.all_reduce(ema.sum)
                torch.distributed.all_reduce(ema.count)
            head = mem.backbone.get_output_embeddings().weight.detach()
            rows = ema_update(mem.bank, mem.embed_weight().detach(), head, ema, t.ema_decay, frozen.to(mem.bank.device),
                              mem.cfg.pad_id)
            mem.last_updated[rows] = step

    eval_n = t.eval_num_samples
    final_n = t.final_eval_num_samples  # None slices everything

    def eval_fn(step):
        return evaluate(mem, tok, bank, omcq_eval[:eval_n] if eval_n else omcq_eval,
                        val_items[:eval_n] if eval_n else val_items)

    trainable_named = {n: p for n, p in mem.named_parameters() if p.requires_grad}

    trainable_state, load_trainable = trainable_io(trainable_named)

    def extra_state():
        return {"bank": mem.bank.cpu(), "usage": mem.usage.cpu(), "last_updated": mem.last_updated.cpu()}

    def load_extra(sd):
        if "bank" in sd:
            mem.bank.copy_(sd["bank"])
            mem.usage.copy_(sd["usage"])
            mem.last_updated.copy_(sd["last_updated"])
            usage_base[0] = mem.usage.detach().clone()

    run_dir = Path(cfg.logging.out_dir) / (cfg.logging.run_name or stage)

    def save_fn(out, info):
        info = dict(info, stage=stage, finetuning_method=method, backbone=spec)
        save_checkpoint(mem, tok, bank.entries, dict(bank.meta), out / "model", info)
        if stage == "router":
            save_router(mem, out / "router")

    task = TrainTask(
        model=mem, param_groups=groups, train_items=items,
        collate=lambda its, micro: X.collate(its, tok.pad_token_id, t.seed * 1_000_003 + micro, cf_prob),
        step_fn=step_fn, trainable_state=trainable_state, load_trainable=load_trainable, save_fn=save_fn,
        eval_fn=eval_fn if (omcq_eval or val_items) else None,
        final_eval_fn=(lambda step: evaluate(mem, tok, bank, omcq_eval[:final_n], val_items[:final_n]))
        if (omcq_eval or val_items) else None,
        after_step=after_step,
        extra_state=extra_state, load_extra_state=load_extra, sync_state=sync_state,
        info={"kind": "explicit-memory"},
    )
    res = run_training(cfg, task, run_dir, f"train {stage}")
    if res["eval"] and stage == "memory" and omcq_train:  # main process only (others get no eval)
        n_train = min(200, final_n) if final_n is not None else 200
        res["eval"]["train_facts_memory_on"] = X.mcq_accuracy(mem, tok, omcq_train[:n_train], bank, "on")
    return res


def _world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def save_router(mem, out: Path) -> None:
    from memcli.records import atomic_dir, write_json

    with atomic_dir(out) as tmp:
        save_tensors(tmp / "router.safetensors", {f"{i}.{k}": v for i, g in mem.gates.items() for k, v in g.state_dict().items()})
        write_json(tmp / "router.json", {"memory_layers": mem.cfg.memory_layers, "knowledge_num": mem.cfg.knowledge_num,
                                         "knowledge_dim": mem.cfg.knowledge_dim, "index_id": mem.cfg.index_id})


def load_router(mem, path) -> None:
    """Strict: every gate tensor present with the right shape, same layers and index space."""
    from memcli.records import read_json_object

    p = Path(path)
    if (p / "router").is_dir():
        p = p / "router"
    meta = read_json_object(p / "router.json", "router config")
    if meta.get("index_id") != mem.cfg.index_id:
        raise MemcliError(f"{p}: router was trained on another bank order (index_id {meta.get('index_id')} != {mem.cfg.index_id})")
    if list(meta.get("memory_layers", [])) != list(mem.cfg.memory_layers):
        raise MemcliError(f"{p}: router has memory layers {meta.get('memory_layers')}, config has {mem.cfg.memory_layers}")
    sd = load_tensors(p / "router.safetensors")
    for i, g in mem.gates.items():
        part = {k[len(i) + 1:]: v for k, v in sd.items() if k.split(".", 1)[0] == i}
        try:
            g.load_state_dict(part, strict=True)
        except RuntimeError as e:
            raise MemcliError(f"{p}/router.safetensors: does not fit gate of layer {i} ({str(e).splitlines()[0][:120]})") from None
