import pytest
from hypothesis import given, settings, strategies as st

from memcli.config import Config, load_config, to_yaml, valid_keys
from memcli.errors import MemcliError


def test_defaults_and_overrides():
    cfg = load_config(overrides=["training.learning_rate=3e-4", "model.memory_layers=[0,2]", "model.keys_path=null"])
    assert cfg.training.learning_rate == pytest.approx(3e-4)
    assert cfg.model.memory_layers == [0, 2]
    assert cfg.model.keys_path is None
    assert isinstance(cfg, Config)


def test_unknown_key_suggests_closest():
    with pytest.raises(MemcliError) as e:
        load_config(overrides=["training.learnin_rate=1e-3"])
    msg = str(e.value)
    assert "unknown key 'training.learnin_rate'" in msg and "did you mean 'training.learning_rate'" in msg


def test_unknown_section():
    with pytest.raises(MemcliError, match="unknown key 'trainig"):
        load_config(overrides=["trainig.batch_size=4"])


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(MemcliError) as e:
        load_config(overrides=["training.batch_size=many"])
    msg = str(e.value)
    assert "training.batch_size" in msg and "'many'" in msg and "int" in msg


def test_not_key_value():
    with pytest.raises(MemcliError, match="expected key=value"):
        load_config(overrides=["training.batch_size"])


def test_choice_and_range_checks():
    with pytest.raises(MemcliError, match="finetuning_method"):
        load_config(overrides=["model.finetuning_method=qlora"])
    with pytest.raises(MemcliError, match="counterfactual_prob"):
        load_config(overrides=["training.counterfactual_prob=1.5"])


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("training:\n  batch_size: 8\n  epochs: 3\nmodel:\n  num_candidates: 4\n")
    cfg = load_config(f, ["training.epochs=5"])
    assert (cfg.training.batch_size, cfg.training.epochs, cfg.model.num_candidates) == (8, 5, 4)
    assert "batch_size: 8" in to_yaml(cfg)


def test_yaml_errors_name_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("training:\n  batch_size: 8\n  epochs: [1\n")
    with pytest.raises(MemcliError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(f)
    g = tmp_path / "typo.yaml"
    g.write_text("training:\n  batch_sise: 8\n")
    with pytest.raises(MemcliError, match=r"typo.yaml: unknown key 'training.batch_sise'; did you mean 'training.batch_size'"):
        load_config(g)
    with pytest.raises(MemcliError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_override_string_gives_config_or_memcli_error(s):
    try:
        load_config(overrides=[s])
    except MemcliError as e:
        assert "\n" not in str(e)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(valid_keys()), st.integers(min_value=1, max_value=64))
def test_every_valid_key_is_accepted_or_type_checked(key, n):
    try:
        cfg = load_config(overrides=[f"{key}={n}"])
    except MemcliError as e:
        assert key in str(e)  # a type or range complaint names the key
    else:
        assert cfg is not None


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "training", "dataset", "logging", "trainig", "x"]),
                       st.dictionaries(st.sampled_from([k.split(".")[1] for k in valid_keys()] + ["bach_size"]),
                                       st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True)
                                       | st.text(max_size=6) | st.lists(st.integers(0, 3), max_size=3), max_size=3)
                       | st.integers() | st.text(max_size=4), max_size=3))
def test_any_yaml_config_gives_config_or_one_line_error(tmp_path_factory, data):
    import yaml

    p = tmp_path_factory.mktemp("yfuzz") / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    try:
        cfg = load_config(config_file=p)
    except MemcliError as e:
        assert "\n" not in str(e) and str(p) in str(e) or "key '" in str(e)
    else:
        assert isinstance(cfg, Config)
