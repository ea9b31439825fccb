"""Every key a recipe accepts is read by that recipe (no key accepted and ignored), and every recipe's example YAML
is its default. Each recipe runs for one optimizer step on the tiny backbone with its config wrapped in a recorder
of attribute reads; a few settings per recipe reach the keys that only some settings read (LoRA, EMA, variants)."""

from dataclasses import dataclass, field, is_dataclass
from pathlib import Path

import pytest

from memcli.config import RECIPES, load_config, valid_keys

EXAMPLES = Path(__file__).parent.parent / "examples"


class Recorder:
    """Wraps a config section; records the dotted name of every leaf key read through it."""

    def __init__(self, obj, seen: set, prefix: str = ""):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_seen", seen)
        object.__setattr__(self, "_prefix", prefix)

    def __getattribute__(self, name):
        if name == "__wrapped__":
            return object.__getattribute__(self, "_obj")
        if name.startswith("__") or name in ("_obj", "_seen", "_prefix"):
            return object.__getattribute__(self, name)
        obj, seen, prefix = (object.__getattribute__(self, k) for k in ("_obj", "_seen", "_prefix"))
        value = getattr(obj, name)
        if is_dataclass(value) and not isinstance(value, type):
            return Recorder(value, seen, f"{prefix}{name}.")
        if not callable(value):
            seen.add(prefix + name)
        return value

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_obj"), name, value)


def read_keys(recipe: str, overrides: list[str], tmp_path: Path, run_name: str) -> set:
    from memcli.kinds import recipe_class
    from memcli.training.loop import train

    cfg = load_config(recipe, overrides=overrides + [f"logging.out_dir={tmp_path / 'out'}", f"logging.run_name={run_name}",
                                                     "training.max_steps=1", "logging.tensorboard=false"])
    seen: set = set()
    train(recipe_class(recipe)(Recorder(cfg, seen)))
    return seen


def test_recorder_finds_a_key_nobody_reads():
    @dataclass
    class Sec:
        used: int = 1
        dead: int = 2

    @dataclass
    class Cfg:
        s: Sec = field(default_factory=Sec)

    seen: set = set()
    r = Recorder(Cfg(), seen)
    assert r.s.used == 1 and r.__wrapped__.s.dead == 2  # reading through __wrapped__ does not count
    assert set(valid_keys(Cfg)) - seen == {"s.dead"}


SETTINGS = {
    "router": [[]],
    "memory": [[], ["training.ema_update_freq=1", "model.finetuning_method=lora", "model.retrieval=product"],
               ["dataset.text_path={data}/text_train.jsonl", "dataset.text_val_path={data}/text_val.jsonl"]],
    "hippo": [["training.stage1_epochs=0"], ["model.hippo_variant=selective", "model.finetuning_method=lora",
                                             "training.stage1_epochs=0"]],
    "hrpo": [["training.batch_size=2"], ["training.batch_size=2", "model.finetuning_method=lora",
                                         "model.thinking_source=projection"]],
}


@pytest.mark.parametrize("recipe", ["router", "fusion", "memory", "hippo", "hrpo"])
def test_no_dead_keys(recipe, tmp_path, default_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # small evaluations: every key is read whatever the number of items scored
    data = ([f"dataset.data_dir={default_data}", "training.eval_num_samples=8", "training.final_eval_num_samples=8"]
            if recipe in ("router", "fusion", "memory") else [])
    if recipe == "hippo":
        from memcli.data.pipeline import gen_dialog

        gen_dialog(tmp_path / "dialog", num_train=40, num_val=8, seed=0)
        data = [f"dataset.data_dir={tmp_path / 'dialog'}", "training.batch_size=4", "training.eval_num_samples=4"]
    if recipe == "hrpo":
        data = ["training.max_completion_length=4", "training.eval_num_samples=2", "training.final_eval_num_samples=2"]
    seen: set = set()
    if recipe == "fusion":
        read_keys("router", data, tmp_path, "router")
        seen |= read_keys("fusion", data + [f"dataset.pretrained_router_path={tmp_path / 'out' / 'router'}"], tmp_path, "f")
    else:
        for i, extra in enumerate(SETTINGS[recipe]):
            seen |= read_keys(recipe, data + [e.format(data=default_data) for e in extra], tmp_path, f"run{i}")
    dead = sorted(set(valid_keys(RECIPES[recipe])) - seen)
    assert not dead, f"keys train {recipe} accepts but never reads: {dead}"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_example_yaml_is_the_recipes_default(recipe):
    from memcli.config import to_dict

    f = EXAMPLES / f"train_{recipe}.yaml"
    assert to_dict(load_config(recipe, f)) == to_dict(load_config(recipe))


@pytest.mark.parametrize("name, recipe, overrides", [
    ("train_memory_smollm2", "memory", ["model.backbone=smollm2-135m"]),
    ("train_hrpo_smollm2", "hrpo", ["model.backbone=smollm2-135m", "training.gradient_checkpointing=false",
                                    "logging.tensorboard=false"]),
    ("train_hrpo_smollm2_projection", "hrpo", [
        "model.backbone=smollm2-135m", "training.gradient_checkpointing=false", "logging.tensorboard=false",
        "model.thinking_source=projection", "training.lambda_lr=1e-2", "training.gate_lr=1e-3",
        "training.projection_lr=1e-3"])])
def test_pretrained_examples_are_the_resolved_pretrained_recipes(name, recipe, overrides):
    from memcli.config import to_dict

    f = EXAMPLES / f"{name}.yaml"
    assert to_dict(load_config(recipe, f)) == to_dict(load_config(recipe, overrides=overrides))


def test_print_config_shows_only_the_recipes_keys(cli):
    code, out, err = cli("train", "hippo", "--print-config")
    assert code == 0, err
    assert "hippo_variant: matrix" in out and "knowledge_num" not in out and "thinking_source" not in out
    code, out, err = cli("train", "memory", "model.backbone=smollm2-135m", "--print-config")
    assert code == 0 and "read: prefix" in out and "memory_layers:\n  - 8" in out


def test_configuration_reference_lists_every_key():
    """The docs' configuration reference is generated from the schemas (docs/hooks/reference.py): every key of every
    recipe, the retriever's too, is in it."""
    import importlib.util

    path = Path(__file__).parent.parent / "docs" / "hooks" / "reference.py"
    spec = importlib.util.spec_from_file_location("docs_reference", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    page = ref.configuration_page()
    from memcli.training.retriever import RetrieverRecipe

    for r, schema in [*RECIPES.items(), ("retriever", RetrieverRecipe)]:
        assert f"`memcli train {r}`" in page
        missing = [k for k in valid_keys(schema) if f"`{k}`" not in page]
        assert not missing, (r, missing)