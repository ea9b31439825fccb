"""``memcli train router|fusion|memory``: key=value overrides on a structured config."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from memcli.views import console, emit, kv_table, table

train = typer.Typer(help="Train memory components (explicit memory stages; HIPPO and HRPO in their own commands).",
                    no_args_is_help=True, rich_markup_mode="rich")


# Per-stage defaults (under the YAML file and key=value overrides). train memory's are the measured
# recipe for the tiny default: 600 optimizer steps of 32 on the synthetic base, about 6 minutes on 2 cores.
STAGE_DEFAULTS = {
    "memory": {"training": {"epochs": 24, "memory_lr": 3e-3, "eval_interval": 100, "eval_num_samples": 100}},
    "router": {"training": {"epochs": 8, "memory_lr": 3e-3, "eval_interval": 100, "eval_num_samples": 100}},
    "fusion": {"training": {"epochs": 8, "memory_lr": 3e-3, "eval_interval": 100, "eval_num_samples": 100}},
}


def _run(stage: str, config: Optional[Path], overrides: List[str], print_config: bool, as_json: bool):
    from memcli.config import load_config, to_yaml
    from memcli.explicit.run import train_explicit

    cfg = load_config(config, overrides or [], defaults=STAGE_DEFAULTS[stage])
    if print_config:
        console.print(to_yaml(cfg), markup=False)
        return
    _summary(stage, train_explicit(cfg, stage), as_json)


def _summary(stage: str, res: dict, as_json: bool) -> None:
    if not res.get("is_main", True):
        return  # other ranks of a distributed run stay quiet
    summary = {"run": res["run_dir"], "optimizer steps": res["steps"], "world size": res["world_size"],
               "elapsed s": round(res["elapsed_s"], 1),
               "final loss": round(res["history"][-1]["loss"], 4) if res["history"] else None}
    summary.update({k: round(v, 4) if isinstance(v, float) else v for k, v in (res["eval"] or {}).items()})
    if as_json:
        emit(summary, True)
        return
    console.print(kv_table(f"train {stage}: summary", summary))


_OVR = typer.Argument(None, help="key=value overrides, e.g. training.learning_rate=3e-4 model.memory_layers=[1,3]")
_CFG = typer.Option(None, "--config", help="YAML config file (sections model, dataset, training, logging).")
_PRINT = typer.Option(False, "--print-config", help="Print the resolved config and exit.")
_JSON = typer.Option(False, "--json", help="Print the summary as JSON.")


@train.command("memory")
def train_memory(overrides: Optional[List[str]] = _OVR, config: Optional[Path] = _CFG, print_config: bool = _PRINT,
                 as_json: bool = _JSON):
    """All memory components on SFT conversations, with router loss and counterfactual edits.

    With no arguments: the built-in tiny backbone trained from scratch on the synthetic knowledge
    base (generated under data/default when absent); the checkpoint lands in out/memory/model.

    [bold]Examples[/bold]

      memcli train memory
      memcli train memory training.epochs=2 training.counterfactual_prob=0.3
      memcli train memory model.qwen3_model_path=/models/Qwen3-0.6B model.cache_path=data/trex/cache model.keys_path=data/trex/keys
      memcli train memory model.finetuning_method=lora training.accumulation_steps=4
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
    """Fusion + MemoryNorm on LM loss, with the gate loaded strictly from the router stage and frozen.

    [bold]Example[/bold]

      memcli train fusion dataset.pretrained_router_path=out/router
    """
    _run("fusion", config, overrides, print_config, as_json)


# the tiny recipe: 2 epochs of the default dialogs (1,124 steps of 32), constant rate after warmup (a cosine
# decay arrives at the recall transition, around step 500, with half the rate, and stalls it)
HIPPO_DEFAULTS = {"dataset": {"data_dir": "data/dialog"},
                  "training": {"epochs": 2, "eval_interval": 200, "eval_num_samples": 100, "lr_scheduler": "constant"}}


@train.command("hippo")
def train_hippo(overrides: Optional[List[str]] = _OVR, config: Optional[Path] = _CFG, print_config: bool = _PRINT,
                as_json: bool = _JSON):
    """HIPPO dialog memory: a state written once per turn, gated into the LLM; staged training.

    Reads [cyan]data_train.jsonl[/cyan] / [cyan]data_val.jsonl[/cyan] from dataset.data_dir (rows dialog_history,
    memory_query, memory_answer; generated with 'memcli gen-data dialog' when absent). Stage 1
    (training.stage1_epochs) trains the encoder and gates; then the backbone is unfrozen
    (model.finetuning_method=lora|full) with training.backbone_lr beside training.hippo_lr.
    Output: <out>/hippo/hippo_model, lora_finetuning or full_parameter_finetuning, checkpoint.json.

    [bold]Examples[/bold]

      memcli train hippo
      memcli train hippo model.hippo_variant=selective model.hippo_init=legs
      memcli train hippo model.qwen3_model_path=/models/Qwen3-0.6B model.finetuning_method=lora training.stage1_epochs=1
    """
    from memcli.config import load_config, to_yaml
    from memcli.hippo.train import train_hippo as run

    cfg = load_config(config, overrides or [], defaults=HIPPO_DEFAULTS)
    if print_config:
        console.print(to_yaml(cfg), markup=False)
        return
    _summary("hippo", run(cfg), as_json)


# the tiny default: the built-in arithmetic task, 4 problems x 4 samples per step, short completions
HRPO_DEFAULTS = {"training": {"batch_size": 4, "max_steps": 60, "eval_interval": 0, "eval_num_samples": 50,
                              "max_completion_length": 32, "lr_scheduler": "constant", "warmup_ratio": 0.0,
                              "log_completions_interval": 20},
                 "logging": {"log_interval": 10}}


@train.command("hrpo")
def train_hrpo(overrides: Optional[List[str]] = _OVR, config: Optional[Path] = _CFG, print_config: bool = _PRINT,
               as_json: bool = _JSON):
    """HRPO latent reasoning: GRPO where each reasoning step feeds back a gated token/latent mix.

    Reads GSM8K-format JSONL (question, answer ending in '#### n') from dataset.train_path (the
    built-in arithmetic task under data/arithmetic when unset) and reports greedy accuracy on
    dataset.eval_path. Each of training.batch_size problems is sampled training.group_size times at
    training.temperature; rewards from training.reward_fn (module:function). Output: <out>/hrpo with
    thinking_residual/, lora/ or backbone/, checkpoint.json.

    [bold]Examples[/bold]

      memcli train hrpo
      memcli train hrpo dataset.train_path=gsm8k/train.jsonl dataset.eval_path=gsm8k/test.jsonl model.qwen3_model_path=/models/Qwen3-0.6B model.finetuning_method=lora
      memcli train hrpo model.thinking_source=projection training.group_size=8 training.beta=0
    """
    from memcli.config import load_config, to_yaml
    from memcli.hrpo.train import train_hrpo as run

    cfg = load_config(config, overrides or [], defaults=HRPO_DEFAULTS)
    if print_config:
        console.print(to_yaml(cfg), markup=False)
        return
    res = run(cfg)
    if "reward_first" in res:
        res.setdefault("eval", {})
        res["eval"] = dict(res["eval"] or {}, reward_first_fifth=res["reward_first"], reward_last_fifth=res["reward_last"])
    _summary("hrpo", res, as_json)


def register(app: typer.Typer) -> None:
    app.add_typer(train, name="train")
