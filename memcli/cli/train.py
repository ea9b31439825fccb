"""``memcli train router|fusion|memory|hippo|hrpo``: each recipe's own schema (memcli/config.py), key=value overrides;
``memcli train retriever`` (memcli/training/retriever.py) the same way."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from memcli.views import console, emit, kv_table

train = typer.Typer(help="Train memory components: explicit memory (router, fusion, memory), HIPPO, HRPO; the turn "
                    "memory's retriever.",
                    no_args_is_help=True, rich_markup_mode="rich")


def _run(recipe: str, config: Optional[Path], overrides: List[str], print_config: bool, as_json: bool):
    from memcli.config import load_config, to_yaml

    cfg = load_config(recipe, config, overrides or [])
    if print_config:
        sys.stdout.write(to_yaml(cfg))  # YAML a file can hold: never wrapped at the terminal width
        return
    from memcli.kinds import recipe_class
    from memcli.training.loop import train as run_recipe

    res = run_recipe(recipe_class(recipe)(cfg))
    if not res.get("is_main", True):
        return  # other ranks of a distributed run stay quiet
    summary = {"run": res["run_dir"], "optimizer steps": res["steps"], "world size": res["world_size"],
               "elapsed s": round(res["elapsed_s"], 1), "s / step": res.get("s_per_step"),
               "peak RSS MB": res.get("peak_rss_mb"),
               "final loss": round(res["history"][-1]["loss"], 4) if res["history"] and res["history"][-1]["loss"]
               is not None else None}
    if "reward_first" in res:
        summary.update(reward_first_fifth=res["reward_first"], reward_last_fifth=res["reward_last"])
    summary.update({k: v for k, v in (res["eval"] or {}).items()})
    summary = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}
    if as_json:
        emit(summary, True)
        return
    console.print(kv_table(f"train {recipe}: summary", summary))


_OVR = typer.Argument(None, help="key=value overrides, e.g. training.learning_rate=3e-4 model.memory_layers=[1,3]")
_CFG = typer.Option(None, "--config", help="YAML config file (sections model, dataset, training, logging; "
                                           "examples/train_<recipe>.yaml).")
_PRINT = typer.Option(False, "--print-config", help="Print this recipe's resolved config (every key it reads) and exit.")
_JSON = typer.Option(False, "--json", help="Print the summary as JSON.")


@train.command("memory")
def train_memory(overrides: Optional[List[str]] = _OVR, config: Optional[Path] = _CFG, print_config: bool = _PRINT,
                 as_json: bool = _JSON):
    """All memory components, with router loss and counterfactual edits.

    With no arguments: the built-in tiny backbone trained from scratch on the synthetic knowledge
    base (generated under data/default when absent); the run lands in out/memory. With a pretrained
    backbone (model.backbone=smollm2-135m, a local directory or a .gguf file) the recipe for pretrained
    models applies: default data from the T-REx slice shipped with memcli, retrieval from the
    backbone's own layer-8 states, the retrieved entry read as a prefix, the backbone frozen.

    [bold]Examples[/bold]

      memcli train memory
      memcli train memory model.backbone=smollm2-135m logging.run_name=real
      memcli train memory model.backbone=smollm2-135m \\
          model.finetuning_method=lora logging.run_name=real-lora
      memcli train memory training.epochs=2 training.counterfactual_prob=0.3 \\
          --print-config
      accelerate launch -m memcli train memory training.zero_stage=2
    """
    _run("memory", config, overrides, print_config, as_json)


@train.command("router")
def train_router(overrides: Optional[List[str]] = _OVR, config: Optional[Path] = _CFG, print_config: bool = _PRINT,
                 as_json: bool = _JSON):
    """MemoryGate alone on the labels of build-keys (router loss); reports recall@k on validation.

    [bold]Example[/bold]

      memcli train router logging.run_name=router training.epochs=5
    """
    _run("router", config, overrides, print_config, as_json)


@train.command("fusion")
def train_fusion(overrides: Optional[List[str]] = _OVR, config: Optional[Path] = _CFG, print_config: bool = _PRINT,
                 as_json: bool = _JSON):
    """Fusion + MemoryNorm on LM loss (the additive read), with the gate loaded strictly from the router stage and frozen.

    [bold]Example[/bold]

      memcli train fusion dataset.pretrained_router_path=out/router
    """
    _run("fusion", config, overrides, print_config, as_json)


@train.command("hippo")
def train_hippo(overrides: Optional[List[str]] = _OVR, config: Optional[Path] = _CFG, print_config: bool = _PRINT,
                as_json: bool = _JSON):
    """HIPPO dialog memory: a state written once per turn, gated into the LLM; staged training.

    Reads dialogs (rows dialog_history, memory_query, memory_answer) from dataset.train_path: a JSONL
    file or a Hugging Face dataset (a save_to_disk directory or a hub id); by default
    data_train.jsonl / data_val.jsonl in dataset.data_dir, generated with 'memcli gen-data dialog'
    when absent. Stage 1 (training.stage1_epochs) trains the encoder and gates
    (training.learning_rate); then the backbone is unfrozen (model.finetuning_method=lora|full) with
    training.backbone_lr. Output: <out>/hippo with hippo_model/, lora/ or backbone/, checkpoint.json.

    [bold]Examples[/bold]

      memcli train hippo
      memcli train hippo model.hippo_variant=selective model.hippo_init=legs
      memcli train hippo model.backbone=smollm2-135m \\
          model.finetuning_method=lora training.stage1_epochs=1
    """
    _run("hippo", config, overrides, print_config, as_json)


@train.command("hrpo")
def train_hrpo(overrides: Optional[List[str]] = _OVR, config: Optional[Path] = _CFG, print_config: bool = _PRINT,
               as_json: bool = _JSON):
    """HRPO latent reasoning: GRPO where each reasoning step feeds back a gated token/latent mix.

    Reads GSM8K-format rows (question, answer ending in '#### n') from dataset.train_path (a JSONL
    file or a Hugging Face dataset; the built-in arithmetic task under data/arithmetic when unset)
    and reports greedy accuracy on dataset.eval_path. Each of training.batch_size problems is sampled
    training.group_size times at training.temperature; rewards from training.reward_fn
    (module:function). Output: <out>/hrpo with thinking_residual/, lora/ or backbone/, checkpoint.json.

    [bold]Examples[/bold]

      memcli train hrpo
      memcli train hrpo dataset.train_path=gsm8k/train.jsonl \\
          dataset.eval_path=gsm8k/test.jsonl model.backbone=smollm2-135m \\
          model.finetuning_method=lora
      memcli train hrpo model.thinking_source=projection training.group_size=8 \\
          training.beta=0
    """
    _run("hrpo", config, overrides, print_config, as_json)


@train.command("retriever")
def train_retriever(overrides: Optional[List[str]] = _OVR, config: Optional[Path] = _CFG, print_config: bool = _PRINT,
                    as_json: bool = _JSON):
    """The turn memory's sentence encoder, fine-tuned on questions and their evidence turns (LoCoMo format).

    Trains on conversations dataset.skip .. skip + dataset.conversations - 1 of dataset.path and reports
    the evidence recall@k of the other (held-out) conversations before and after. Output: a
    sentence-transformers directory <out>/turn-encoder (with memcli_turn_encoder.json naming the trained
    conversations) for 'compare locomo --encoder DIR' and 'chat -t hippo --recall N --encoder DIR'.
    About 15 minutes on 2 CPU cores for LoCoMo's first 5 conversations.

    [bold]Examples[/bold]

      memcli train retriever dataset.path=locomo10.json
      memcli train retriever dataset.path=locomo10.json dataset.skip=5 \\
          training.epochs=2 logging.run_name=enc-6-10
    """
    from memcli.config import load_config, to_yaml
    from memcli.training.retriever import RetrieverRecipe, train_retriever as run

    cfg = load_config(RetrieverRecipe, config, overrides or [])
    if print_config:
        sys.stdout.write(to_yaml(cfg))  # YAML a file can hold: never wrapped at the terminal width
        return

    def log(step: int, steps: int, loss: float):
        if step == 1 or step == steps or step % cfg.logging.log_interval == 0:
            console.print(f"step {step}/{steps} loss {loss:.4f}", highlight=False)

    res = run(cfg, log=None if as_json else log)
    if as_json:
        emit(res, True)
        return
    summary = {k: v for k, v in res.items() if not k.startswith("recall_")}
    for k in ("recall@1", "recall@5", "recall@10"):
        if res["recall_before"]:
            summary[f"held-out {k}"] = f"{res['recall_before'][k]:.3f} -> {res['recall_after'][k]:.3f}"
    summary = {k: ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in summary.items()}
    console.print(kv_table("train retriever: summary", summary))


def register(app: typer.Typer) -> None:
    app.add_typer(train, name="train")
