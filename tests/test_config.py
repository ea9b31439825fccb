"""Per-recipe config schemas: unknown keys name the recipe's closest key, enums refuse other values, per-backbone
defaults resolve in one place, YAML files and overrides merge, and resumes refuse a changed config."""

import pytest
from hypothesis import given, settings, strategies as st

from memcli.config import (RECIPES, EntryKey, MemoryRecipe, Method, Read, flat, load_config, resume_conflict, to_dict,
                           to_yaml,
                           valid_keys)
from memcli.errors import MemcliError


def test_defaults_and_overrides():
    cfg = load_config("memory", overrides=["training.learning_rate=3e-4", "model.memory_layers=[0,2]", "model.keys_path=null"])
    assert cfg.training.learning_rate == pytest.approx(3e-4)
    assert cfg.model.memory_layers == [0, 2]
    assert cfg.model.keys_path is None
    assert isinstance(cfg, MemoryRecipe)


def test_unknown_key_suggests_closest_of_the_recipe():
    with pytest.raises(MemcliError) as e:
        load_config("memory", overrides=["training.learnin_rate=1e-3"])
    msg = str(e.value)
    assert "unknown key 'training.learnin_rate' for train memory" in msg and "did you mean 'training.learning_rate'" in msg


@pytest.mark.parametrize("recipe, key, want", [
    ("hippo", "dataset.sft_dataset_path", "dataset.train_path"),  # hippo's name for its training dialogs
    ("memory", "dataset.train_path", "dataset.sft_dataset_path"),  # explicit memory keeps the seed's name
    ("hippo", "training.hippo_lr", "training.learning_rate"),
    ("memory", "training.memory_lr", "training.learning_rate"),
    ("hrpo", "training.learning_rate", "training.backbone_lr"),
    ("hippo", "dataset.max_length", "dataset.max_prompt_length"),
])
def test_a_key_of_another_recipe_points_to_this_recipes_name(recipe, key, want):
    with pytest.raises(MemcliError) as e:
        load_config(recipe, overrides=[f"{key}=1"])
    assert f"unknown key '{key}' for train {recipe}" in str(e.value) and f"did you mean '{want}'" in str(e.value)


def test_recipes_hold_only_their_keys():
    hippo, memory, hrpo, router = (set(valid_keys(RECIPES[r])) for r in ("hippo", "memory", "hrpo", "router"))
    assert "model.knowledge_num" not in hippo and "training.router_loss_coef" not in hippo
    assert "model.thinking_source" not in memory and "training.group_size" not in memory
    assert "dataset.data_dir" not in hrpo and "training.zero_stage" not in hrpo  # hrpo runs on one process
    assert "model.finetuning_method" not in router and "training.backbone_lr" not in router
    assert "model.lora_rank" in memory and "model.lora_rank" in hippo and "model.lora_rank" in hrpo


def test_unknown_section():
    with pytest.raises(MemcliError, match="unknown key 'trainig"):
        load_config("memory", overrides=["trainig.batch_size=4"])


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(MemcliError) as e:
        load_config("memory", overrides=["training.batch_size=many"])
    msg = str(e.value)
    assert "training.batch_size" in msg and "'many'" in msg and "int" in msg


def test_not_key_value():
    with pytest.raises(MemcliError, match="expected key=value"):
        load_config("memory", overrides=["training.batch_size"])


def test_choices_are_enums_and_ranges_are_checked():
    with pytest.raises(MemcliError, match="'model.finetuning_method' got 'qlora', expected one of auto, frozen, lora, full"):
        load_config("memory", overrides=["model.finetuning_method=qlora"])
    with pytest.raises(MemcliError, match="training.device"):
        load_config("memory", overrides=["training.device=tpu"])
    with pytest.raises(MemcliError, match="counterfactual_prob"):
        load_config("memory", overrides=["training.counterfactual_prob=1.5"])
    with pytest.raises(MemcliError, match="zero_stage"):
        load_config("memory", overrides=["training.zero_stage=5"])


def test_per_backbone_defaults_resolve_in_one_place():
    tiny = load_config("memory")
    real = load_config("memory", overrides=["model.backbone=/models/some-llama"])
    assert (tiny.model.read, tiny.model.memory_layers, tiny.model.finetuning_method) == (Read.additive, [1], Method.full)
    assert (real.model.read, real.model.memory_layers, real.model.finetuning_method) == (Read.prefix, [8], Method.frozen)
    assert real.model.entry_key == EntryKey.hidden and real.dataset.data_dir == "data/some-llama"
    assert tiny.dataset.data_dir == "data/default"
    # a value the user gives is never replaced; the seeds' alias names the backbone too
    mine = load_config("memory", overrides=["model.qwen3_model_path=/m/q", "model.memory_layers=[3]"])
    assert mine.model.memory_layers == [3] and mine.model.read == Read.prefix
    assert "backbone: tiny" in to_yaml(tiny) and "read: prefix" in to_yaml(real)
    with pytest.raises(MemcliError, match="name two backbones"):
        load_config("memory", overrides=["model.qwen3_model_path=/m/q", "model.backbone=/m/r"])


def test_variant_specific_hippo_keys():
    assert load_config("hippo").model.hippo_value_dim == 64
    assert load_config("hippo", overrides=["model.hippo_variant=selective"]).model.hippo_expand == 2
    with pytest.raises(MemcliError, match="hippo_value_dim' applies to hippo_variant=matrix"):
        load_config("hippo", overrides=["model.hippo_variant=selective", "model.hippo_value_dim=32"])
    with pytest.raises(MemcliError, match="hippo_expand' applies to hippo_variant=selective"):
        load_config("hippo", overrides=["model.hippo_expand=3"])


def test_prefix_read_wants_one_layer():
    with pytest.raises(MemcliError, match="read=prefix retrieves at one layer"):
        load_config("memory", overrides=["model.read=prefix", "model.memory_layers=[1,3]"])


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("training:\n  batch_size: 8\n  epochs: 3\nmodel:\n  num_candidates: 4\n")
    cfg = load_config("memory", f, ["training.epochs=5"])
    assert (cfg.training.batch_size, cfg.training.epochs, cfg.model.num_candidates) == (8, 5, 4)
    assert "batch_size: 8" in to_yaml(cfg)


def test_yaml_errors_name_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("training:\n  batch_size: 8\n  epochs: [1\n")
    with pytest.raises(MemcliError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config("memory", f)
    g = tmp_path / "typo.yaml"
    g.write_text("training:\n  batch_sise: 8\n")
    with pytest.raises(MemcliError, match=r"typo.yaml: unknown key 'training.batch_sise' for train memory; did you mean "
                                          r"'training.batch_size'"):
        load_config("memory", g)
    with pytest.raises(MemcliError, match="config file not found"):
        load_config("memory", tmp_path / "missing.yaml")


def test_resume_conflict_names_the_key_and_ignores_watch_only_keys():
    a = to_dict(load_config("memory"))
    b = to_dict(load_config("memory", overrides=["training.eval_interval=7", "training.resume=auto"]))
    assert resume_conflict(a, b) is None
    c = to_dict(load_config("memory", overrides=["training.learning_rate=0.5"]))
    assert "training.learning_rate" in resume_conflict(a, c)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_override_string_gives_config_or_memcli_error(s):
    try:
        load_config("memory", overrides=[s])
    except MemcliError as e:
        assert "\n" not in str(e)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(RECIPES)), st.data())
def test_every_valid_key_is_accepted_or_type_checked(recipe, data):
    key = data.draw(st.sampled_from(valid_keys(RECIPES[recipe])))
    n = data.draw(st.integers(min_value=1, max_value=64))
    try:
        cfg = load_config(recipe, overrides=[f"{key}={n}"])
    except MemcliError as e:
        assert f"key '{key}'" in str(e) and "\n" not in str(e)  # a type or range complaint names the key
    else:
        got = flat(to_dict(cfg))[key]  # the value given is the value used, as the key's type (str, float, ...)
        # (OmegaConf reads a non-zero integer given to a boolean key as true)
        assert got == n or got == str(n) or (isinstance(got, bool) and got == bool(n)), (key, n, got)


_LEAVES = sorted({k.split(".")[1] for r in RECIPES.values() for k in valid_keys(r)})


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(sorted(RECIPES)),
       st.dictionaries(st.sampled_from(["model", "training", "dataset", "logging", "trainig", "x"]),
                       st.dictionaries(st.sampled_from(_LEAVES + ["bach_size"]),
                                       st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True)
                                       | st.text(max_size=6) | st.lists(st.integers(0, 3), max_size=3), max_size=3)
                       | st.integers() | st.text(max_size=4), max_size=3))
def test_any_yaml_config_gives_config_or_one_line_error(tmp_path_factory, recipe, data):
    import yaml

    p = tmp_path_factory.mktemp("yfuzz") / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    try:
        cfg = load_config(recipe, config_file=p)
    except MemcliError as e:
        assert "\n" not in str(e) and (str(p) in str(e) or "key '" in str(e) or "backbone" in str(e))
    else:  # every key the file sets holds the file's value (as the key's type)
        got = flat(to_dict(cfg))
        for sec, vals in data.items():
            for k, v in vals.items():
                if v is not None:
                    assert got[f"{sec}.{k}"] == v or str(got[f"{sec}.{k}"]) == str(v), (sec, k, v, got[f"{sec}.{k}"])
