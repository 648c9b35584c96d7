"""The config's promises: every preset in configs/ validates against the dataclasses, unknown keys and wrong
types are refused naming the key, ``--set`` values are parsed as YAML, and every bad input is a ConfigError.

Presets are found by glob, so a preset added later is checked without touching this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import trainer.config.schema as config_module
from trainer.config.files import (
    build_config,
    diff_keys,
    load_yaml,
    parse_override,
    preset_names,
    resolve_preset,
)
from trainer.config.schema import (
    CONFIG_DIR,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    from_dict,
)

BASE_YAML = CONFIG_DIR / "training" / "base_training.yaml"
OURS = ("training", "model", "data", "lora")
NOT_OURS = ("accelerate",)  # Accelerate's own launch configs, validated by `accelerate launch`
PRESETS = sorted(
    p for section in OURS for ext in ("yaml", "yml") for p in (CONFIG_DIR / section).glob(f"*.{ext}")
)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def base_with(tmp_path: Path, **changes: Any) -> Path:
    """A copy of the base training preset with top-level keys changed or added."""
    return write_yaml(tmp_path / "training.yaml", {**load_yaml(BASE_YAML), **changes})


def train_config(base: dict[str, Any] | Path, overrides: list[tuple[str, Any]] = ()) -> TrainConfig:  # type: ignore[assignment]
    return build_config(base, overrides, TrainConfig)


def config_error(base: Path, overrides: list[tuple[str, Any]] = ()) -> str:  # type: ignore[assignment]
    with pytest.raises(ConfigError) as info:
        build_config(base, overrides)
    return str(info.value)


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_preset_yaml_validates_against_the_config_dataclasses(path: Path) -> None:
    section = path.parent.name
    if section == "training":
        assert isinstance(build_config(path), TrainConfig)
    elif section == "model":
        assert isinstance(from_dict(ModelConfig, load_yaml(path), "model."), ModelConfig)
    elif section == "data":
        assert isinstance(from_dict(DataConfig, load_yaml(path), "data."), DataConfig)
    else:
        lora_cls = getattr(config_module, "LoraConfig", None)
        if lora_cls is None:
            pytest.skip(
                "trainer.config.schema has no LoraConfig yet, so configs/lora presets cannot be validated"
            )
        assert isinstance(from_dict(lora_cls, load_yaml(path), "lora."), lora_cls)


def test_every_config_folder_is_validated_or_known_to_belong_to_another_tool() -> None:
    folders = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    assert folders <= set(OURS) | set(NOT_OURS), "a new configs/ folder needs a case in the preset test"
    for section in ("training", "model", "data"):
        assert list((CONFIG_DIR / section).glob("*.yaml")), f"no presets found in configs/{section}"


def test_model_presets_are_named_after_their_file() -> None:
    for name in preset_names("model"):
        assert load_yaml(resolve_preset("model", name))["name"] == name


# --------------------------------------------------------------------------------------------------
# Unknown keys and wrong types
# --------------------------------------------------------------------------------------------------


def test_preset_with_unknown_key_is_refused(tmp_path: Path) -> None:
    message = config_error(base_with(tmp_path, qqq=1))
    assert "unknown config key 'qqq'" in message
    assert "did you mean" not in message  # nothing is close to 'qqq'
    assert "valid keys here: experiment, model, data" in message


def test_unknown_key_close_to_a_real_one_suggests_it(tmp_path: Path) -> None:
    message = config_error(base_with(tmp_path, epoch=5))
    assert "'epoch'" in message
    assert "did you mean 'epochs'" in message


def test_unknown_nested_key_in_a_preset_is_refused_with_its_dotted_name(tmp_path: Path) -> None:
    checkpoint = {**load_yaml(BASE_YAML)["checkpoint"], "keep_last": 2}
    message = config_error(base_with(tmp_path, checkpoint=checkpoint))
    assert "'checkpoint.keep_last'" in message
    assert "did you mean 'checkpoint.keep_last_n'" in message


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("epochs", "three", "'epochs'"),
        ("epochs", True, "'epochs'"),  # YAML `true` is not the integer 1
        ("epochs", 2.5, "'epochs'"),
        ("learning_rate", "fast", "'learning_rate'"),
        ("betas", 0.9, "'betas'"),
        ("experiment", 7, "'experiment'"),
        ("model.channels", ["a", "b"], "'model.channels[0]'"),
        ("model.channels", 32, "'model.channels'"),
        ("data.download", "yes", "'data.download'"),
        ("checkpoint.keep_last_n", False, "'checkpoint.keep_last_n'"),
        ("model", 42, "'model'"),
    ],
)
def test_wrong_type_is_refused_naming_the_key(key: str, value: Any, named: str) -> None:
    assert named in config_error(BASE_YAML, [(key, value)])


def test_wrong_type_in_a_preset_file_is_refused_naming_the_key(tmp_path: Path) -> None:
    assert "'epochs'" in config_error(base_with(tmp_path, epochs="three"))


def test_integers_are_accepted_where_a_float_is_expected() -> None:
    config = train_config(BASE_YAML, [("learning_rate", 1), ("grad_clip", 0)])
    assert config.learning_rate == 1.0
    assert isinstance(config.learning_rate, float)


# --------------------------------------------------------------------------------------------------
# --set overrides
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("epochs=5", ("epochs", 5)),
        ("learning_rate=0.0005", ("learning_rate", 0.0005)),
        ("model.channels=[32, 64]", ("model.channels", [32, 64])),
        ("max_steps_per_epoch=null", ("max_steps_per_epoch", None)),
        ("data.download=true", ("data.download", True)),
        ("experiment=my run", ("experiment", "my run")),
        (" checkpoint.keep_last_n = 2", ("checkpoint.keep_last_n", 2)),
        ("experiment=a=b", ("experiment", "a=b")),
    ],
)
def test_set_override_values_are_parsed_as_yaml(text: str, expected: tuple[str, Any]) -> None:
    assert parse_override(text) == expected


def test_set_override_accepts_scientific_notation() -> None:
    config = train_config(BASE_YAML, [parse_override("learning_rate=1e-3")])
    assert config.learning_rate == pytest.approx(1e-3)


def test_set_overrides_change_nested_keys_and_leave_the_rest() -> None:
    overrides = [
        parse_override(t)
        for t in ("model.channels=[8, 16, 32]", "checkpoint.keep_last_n=0", "max_steps_per_epoch=null")
    ]
    config = train_config(BASE_YAML, overrides)
    default = train_config(BASE_YAML)
    assert config.model.channels == [8, 16, 32]
    assert config.checkpoint.keep_last_n == 0
    assert config.max_steps_per_epoch is None
    assert config.model.head_dim == default.model.head_dim
    assert config.checkpoint.monitor == default.checkpoint.monitor


def test_set_override_of_unknown_nested_key_is_refused() -> None:
    message = config_error(BASE_YAML, [parse_override("model.chanels=[8, 16]")])
    assert "'model.chanels'" in message
    assert "did you mean 'model.channels'" in message


def test_set_override_below_a_plain_value_is_refused() -> None:
    assert "'epochs'" in config_error(BASE_YAML, [parse_override("epochs.total=3")])


@pytest.mark.parametrize("text", ["epochs", "epochs:3", "=3", ""])
def test_set_without_key_and_equals_sign_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_override(text)


# --------------------------------------------------------------------------------------------------
# Files and preset names
# --------------------------------------------------------------------------------------------------


def test_bad_yaml_file_is_a_config_error_not_a_yaml_exception(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\nmodel: {\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        build_config(bad)
    assert str(info.value).startswith(f"{bad}:2:6 is not valid YAML: expected ',' or ']'")
    assert "\n" not in str(info.value)  # one line, naming the file and the spot


def test_yaml_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    listing = tmp_path / "list.yaml"
    listing.write_text("- epochs\n- 3\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(listing)


def test_empty_yaml_file_gives_the_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert build_config(empty) == TrainConfig()


def test_missing_config_file_is_refused_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        build_config(missing)
    assert str(missing) in str(info.value)


def test_missing_preset_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model config file not found"):
        build_config(BASE_YAML, [("model", str(tmp_path / "mine.yaml"))])


@pytest.mark.parametrize("section", ["model", "data"])
def test_unknown_preset_name_is_refused_with_the_list_of_choices(section: str) -> None:
    message = config_error(BASE_YAML, [(section, "no_such_preset")])
    assert f"unknown {section} 'no_such_preset'" in message
    for name in preset_names(section):
        assert name in message


def test_misspelt_preset_name_suggests_the_right_one() -> None:
    assert "did you mean 'diffit_tiny'" in config_error(BASE_YAML, [("model", "diffit_tiyn")])


def test_model_flag_replaces_the_whole_model_section_with_the_preset() -> None:
    config = train_config(BASE_YAML, [("model", "diffit_tiny")])
    assert config.model == from_dict(ModelConfig, load_yaml(CONFIG_DIR / "model" / "diffit_tiny.yaml"))


def test_preset_can_be_given_as_a_yaml_path(tmp_path: Path) -> None:
    mine = write_yaml(tmp_path / "mine.yaml", {"name": "mine", "channels": [4, 8]})
    config = train_config(BASE_YAML, [("model", str(mine))])
    assert config.model.name == "mine"
    assert config.model.channels == [4, 8]


@pytest.mark.parametrize("flag", ["CIFAR10", "cifar10", "cifar"])
def test_dataset_alias_resolves_to_the_cifar10_preset(flag: str) -> None:
    config = train_config(BASE_YAML, [("data", flag)])
    assert config.data == from_dict(DataConfig, load_yaml(CONFIG_DIR / "data" / "cifar10.yaml"))


def test_training_yaml_may_hold_model_and_data_inline(tmp_path: Path) -> None:
    config = train_config(base_with(tmp_path, model={"channels": [8]}, data={"source": "digits"}))
    assert config.model.channels == [8]
    assert config.data.source == "digits"


def test_a_runs_stored_config_dict_rebuilds_the_same_config() -> None:
    config = train_config(BASE_YAML)
    stored = config.to_dict()
    assert build_config(stored) == config
    assert stored == config.to_dict()  # building from a dict does not change it


# --------------------------------------------------------------------------------------------------
# Range checks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("epochs", 0, "'epochs'"),
        ("batch_size", 0, "'batch_size'"),
        ("learning_rate", 0, "'learning_rate'"),
        ("betas", [0.9], "'betas'"),
        ("max_steps_per_epoch", 0, "'max_steps_per_epoch'"),
        ("checkpoint.keep_last_n", -1, "'checkpoint.keep_last_n'"),
        ("checkpoint.save_every_n_epochs", 0, "'checkpoint.save_every_n_epochs'"),
        ("checkpoint.mode", "median", "'checkpoint.mode'"),
        ("checkpoint.monitor", "accuracy", "'checkpoint.monitor'"),
        ("model.channels", [], "'model.channels'"),
        ("model.label_dropout", 1.0, "'model.label_dropout'"),
        ("data.val_fraction", 1.0, "'data.val_fraction'"),
        ("edm.sigma_min", 100.0, "'edm.sigma_min/sigma_max'"),
        ("checkpoint.monitor", "accuracy", "'checkpoint.monitor'"),
    ],
)
def test_out_of_range_value_is_a_config_error_naming_the_key(key: str, value: Any, named: str) -> None:
    assert named in config_error(BASE_YAML, [(key, value)])


def test_keep_last_n_zero_means_keep_all_and_is_accepted() -> None:
    assert CheckpointConfig(keep_last_n=0).keep_last_n == 0


# --------------------------------------------------------------------------------------------------
# diff_keys (resume refuses model changes it finds)
# --------------------------------------------------------------------------------------------------


def test_diff_keys_finds_differing_nested_keys() -> None:
    a = {"epochs": 3, "model": {"channels": [8, 16], "head_dim": 8}, "edm": {"rho": 7.0}, "only_a": 1}
    b = {"epochs": 3, "model": {"channels": [8, 32], "head_dim": 8}, "edm": {"rho": 5.0}, "only_b": 2}
    assert diff_keys(a, b) == ["edm.rho", "model.channels", "only_a", "only_b"]


def test_diff_keys_of_equal_configs_is_empty() -> None:
    stored = train_config(BASE_YAML).to_dict()
    assert diff_keys(stored, train_config(stored).to_dict()) == []


def test_diff_keys_reports_architecture_change_from_a_model_flag() -> None:
    stored = train_config(BASE_YAML).to_dict()
    changed = train_config(stored, [("model", "diffit_cifar")]).to_dict()
    assert "channels" in diff_keys(stored["model"], changed["model"])


def test_a_lora_run_is_named_after_the_data_it_fine_tunes_on() -> None:
    lora_yaml = CONFIG_DIR / "training" / "lora_finetuning.yaml"
    assert build_config(lora_yaml).experiment == "diffit_lora_cifar100_trees_only"
    assert build_config(lora_yaml, [("data", "digits_0_4")]).experiment == "diffit_lora_digits_0_4"
    assert build_config(lora_yaml, [("data", "digits_0_4"), ("experiment", "mine")]).experiment == "mine"
