"""The config loader: YAML + dotted overrides into frozen, typed dataclasses."""

from __future__ import annotations

import dataclasses

import pytest

from still.config import DataConfig, flatten, load_config, replace, to_dict
from still.errors import StillError


@dataclasses.dataclass(frozen=True)
class KD:
    temperature: float = 4.0
    weight: float = 0.5

    def __post_init__(self):
        if self.temperature <= 0:
            raise StillError(f"kd.temperature must be > 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class Root:
    data: DataConfig = DataConfig()
    kd: KD = KD()
    uris: str | tuple[str, ...] = ""
    epochs: int = 1
    fast: bool = False


@dataclasses.dataclass(frozen=True)
class Sweep:
    kd: KD = dataclasses.field(default_factory=lambda: KD(temperature=20.0))


def test_a_key_under_a_section_keeps_the_parents_defaults_for_the_rest():
    assert load_config(Sweep, None, []).kd == KD(temperature=20.0, weight=0.5)
    # KD's own default temperature is 4; Sweep declares 20, and setting kd.weight must not undo that
    assert load_config(Sweep, None, ["kd.weight=0.9"]).kd == KD(temperature=20.0, weight=0.9)
    assert load_config(Sweep, None, ["kd.temperature=2"]).kd == KD(temperature=2.0, weight=0.5)


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("kd: {temperature: 2}\ndata: {source: builtin:mnist}\nepochs: 3\n")
    config = load_config(Root, path, ["kd.temperature=20", "uris=[a, b]", "fast=true"])
    assert config.kd.temperature == 20.0 and isinstance(config.kd.temperature, float)
    assert config.data.source == "builtin:mnist"
    assert config.epochs == 3
    assert config.uris == ("a", "b")
    assert config.fast is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 4  # type: ignore[misc]


def test_unknown_key_lists_valid_keys():
    with pytest.raises(StillError) as info:
        load_config(Root, None, ["kd.temprature=2"])
    message = str(info.value)
    assert "'kd.temprature'" in message
    assert "kd.temperature" in message and "kd.weight" in message


def test_wrong_type_names_the_key():
    with pytest.raises(StillError, match="epochs must be an integer"):
        load_config(Root, None, ["epochs=two"])
    with pytest.raises(StillError, match="fast must be true or false"):
        load_config(Root, None, ["fast=3"])


def test_post_init_checks_name_the_key():
    with pytest.raises(StillError, match=r"kd.temperature must be > 0, got 0"):
        load_config(Root, None, ["kd.temperature=0"])
    with pytest.raises(StillError, match="data.val_fraction"):
        load_config(Root, None, ["data.val_fraction=1.5"])


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(StillError, match="does not exist"):
        load_config(Root, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(StillError, match="must hold a mapping"):
        load_config(Root, bad)


def test_replace_flatten_and_to_dict_round_trip():
    config = load_config(Root, None, ["kd.weight=0.25"])
    changed = replace(config, {"kd.weight": 0.75, "epochs": 9})
    assert (changed.kd.weight, changed.epochs, config.kd.weight) == (0.75, 9, 0.25)
    flat = flatten(changed)
    assert flat["kd.weight"] == 0.75 and flat["data.source"] == "builtin:digits"
    assert to_dict(changed)["kd"] == {"temperature": 4.0, "weight": 0.75}
    with pytest.raises(StillError, match="kd.temperature must be > 0"):
        replace(config, {"kd.temperature": -1})
