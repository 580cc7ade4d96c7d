"""The still command line: help, errors and exit codes, through ``python -m still_cli``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from still_cli.main import build_parser, resolve_config
from still_cli.verbs import VERBS

REPO = Path(__file__).resolve().parents[1]


def still(*args: str, cwd=None) -> subprocess.CompletedProcess:
    # PYTHONPATH: this checkout, whatever the editable install points at.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "still_cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def test_console_script_is_the_cli():
    """``pip install`` makes ``still`` call what pyproject.toml names: the entry that
    ``python -m still_cli`` (what these tests run) calls too."""
    import importlib
    import tomllib

    from still_cli.main import console_main

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["still"].partition(":")
    assert getattr(importlib.import_module(module), name) is console_main
    assert "console_main()" in (REPO / "still_cli" / "__main__.py").read_text()


def test_help_lists_every_verb_with_an_example():
    result = still("--help")
    assert result.returncode == 0
    for verb in ("infer", "train", "tune", "run", "store", "submit", "jobs", "cluster"):
        assert f"\n  {verb} " in result.stdout
    assert "still infer data.source=builtin:mnist" in result.stdout
    assert "still run configs/mnist.yaml" in result.stdout


def test_unknown_config_key_is_a_one_line_error(tmp_path):
    result = still("infer", "store.mdoe=dense", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("still: error: unknown config key 'store.mdoe'")
    assert "store.mode" in result.stderr


def test_missing_config_file(tmp_path):
    result = still("train", "--config", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "config file 'nope.yaml' does not exist" in result.stderr


# ------------------------------------------------------------------------- still VERB --help: the config keys


def _help_line(stdout: str, key: str) -> list[str]:
    """A key's help entry as words: key, type, default, then its doc (on its line, or wrapped under it)."""
    lines = stdout.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith(f"  {key} ")]
    assert len(at) == 1, f"{key} not listed once in the help"
    words = lines[at[0]].split()
    for line in lines[at[0] + 1:]:
        if not line.startswith("      "):
            break
        words += line.split()
    return words


def test_train_help_lists_keys_with_type_default_and_doc(tmp_path):
    result = still("train", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "--print-config" in out and "--verbose" in out
    assert _help_line(out, "train.epochs")[:2] == ["train.epochs", "int"]
    assert _help_line(out, "train.epochs")[2] == "10"
    assert " ".join(_help_line(out, "train.epochs")[3:]) == "Passes over the training split."
    assert _help_line(out, "data.image.mean")[:3] == ["data.image.mean", "list[float]", "[]"]
    assert _help_line(out, "scaling.num_workers")[:3] == ["scaling.num_workers", "list[int]", "[2]"]
    assert _help_line(out, "kd.tail")[:4] == ["kd.tail", "one", "of", "uniform|bucket"]
    assert _help_line(out, "scaling.resources_per_worker")[1:3] == ["dict[str,", "float]"]
    assert _help_line(out, "ray.verbose")[1:3] == ["bool", "false"]
    # Grouped by section, each under a header carrying the section's doc.
    assert "\ntrain: The optimisation loop and its outputs.\n" in out
    assert "\ndata.image: " in out
    assert out.index("\ndata:") < out.index("\ndata.image:") < out.index("\nstudent:")


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_help_lists_every_key_of_the_verb(verb, tmp_path):
    from still.config import flatten
    from still_cli.config_help import config_keys

    rows = config_keys(VERBS[verb].config_class)
    keys = [row.key for row in rows]
    # Every key a resolved config has (flatten leaves out empty mappings: those are dict-typed keys).
    config = resolve_config(build_parser().parse_args([verb, "store.uri=s"] if verb == "tune" else [verb]))
    flat = set(flatten(config))
    assert flat <= set(keys)
    assert all(row.type.startswith("dict") for row in rows if row.key not in flat)
    out = still(verb, "--help", cwd=tmp_path).stdout
    missing = [key for key in keys if f"\n  {key} " not in out]
    assert not missing, f"still {verb} --help does not list {missing}"


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_config_key_has_a_doc(verb):
    """Each field needs a docstring right under it in its config dataclass."""
    from still_cli.config_help import config_keys

    undocumented = [row.key for row in config_keys(VERBS[verb].config_class) if not row.doc.strip()]
    assert not undocumented, f"{verb}: add a docstring under these config fields: {undocumented}"


def test_config_keys_types_defaults_and_first_sentences():
    from still_cli.config_help import config_keys, first_sentence
    from tuning.config import TuneConfig

    rows = {row.key: row for row in config_keys(TuneConfig)}
    # The root's section default wins over the section class's own default.
    assert rows["scaling.num_workers"].default == "[1]"
    assert rows["tune.mode"].type == 'one of ""|max|min'
    assert rows["store.uri"].type == "list[str]"
    assert rows["space.width"].type == "any" and rows["space.width"].default == "null"
    assert rows["tune.name"].section == "tune"
    assert first_sentence("Wrapped\n    over lines, e.g. here (see x. Y) too. Second one.") == (
        "Wrapped over lines, e.g. here (see x. Y) too.")
    assert first_sentence("``a``: first\n\nsecond paragraph") == "`a`: first"


def test_infer_store_include_inputs_union_type():
    from still_cli.config_help import config_keys
    from teacher_infer.config import InferConfig

    rows = {row.key: row for row in config_keys(InferConfig)}
    assert rows["store.include_inputs"].type == "bool|auto"
    assert rows["store.temperatures"].default == "[1.0, 2.0, 4.0, 8.0]"


# --------------------------------------------------------------------------- --print-config, --verbose


def test_print_config_prints_the_override_and_runs_nothing(tmp_path):
    # In a fresh interpreter: the config is printed and Ray is never imported.
    script = (
        "import sys\n"
        "from still_cli.main import main\n"
        "code = main(['train', '--print-config', '--json', 'train.epochs=3', '--verbose',\n"
        "             'scaling.num_workers=0'])\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout.strip().splitlines()[-1])
    assert config["train"]["epochs"] == 3
    assert config["scaling"]["num_workers"] == [0]
    assert config["ray"]["verbose"] is True  # --verbose, given between two overrides
    assert not list(tmp_path.iterdir()), "--print-config wrote files"


def test_print_config_yaml_loads_back_as_the_same_config(tmp_path):
    from still.config import load_config
    from student_train.config import TrainConfig

    overrides = ["train.epochs=3", "data.image.mean=[0.5]", "data.image.std=[0.25]", "kd.tail=uniform"]
    result = still("train", "--print-config", *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "  epochs: 3\n" in result.stdout
    assert "  mean: [0.5]\n" in result.stdout
    (tmp_path / "printed.yaml").write_text(result.stdout)
    assert load_config(TrainConfig, tmp_path / "printed.yaml") == load_config(TrainConfig, None, overrides)


def test_print_config_with_a_bad_override_names_the_key(tmp_path):
    result = still("train", "--print-config", "train.epcohs=3", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("still: error: unknown config key 'train.epcohs'")
    assert "train.epochs" in result.stderr
    result = still("train", "--print-config", "train.epochs=many", cwd=tmp_path)
    assert result.returncode == 2
    assert "train.epochs must be an integer" in result.stderr


def test_verbose_and_address_are_ray_overrides():
    argv = ["train", "--verbose", "--address", "ray://head:10001", "train.epochs=2"]
    args = build_parser().parse_args(argv)
    config = resolve_config(args)
    assert config.ray.verbose is True
    assert config.ray.address == "ray://head:10001"
    assert resolve_config(build_parser().parse_args(["infer"])).ray.verbose is False


def test_stray_argument_after_a_flag_is_still_an_error(tmp_path):
    result = still("train", "--verbose", "--bogus", cwd=tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr


def test_run_verbose_and_address_reach_the_pipeline(tmp_path):
    """Each stage's config then gets them (tests/test_pipeline.py)."""
    from still_cli.pipeline import pipeline_from_args

    (tmp_path / "p.yaml").write_text("stages:\n  - {name: a, verb: train}\n")
    args = build_parser().parse_args(["run", str(tmp_path / "p.yaml"), "--verbose", "--address", "ray://h:1"])
    pipeline = pipeline_from_args(args)
    assert (pipeline.ray.verbose, pipeline.ray.address) == (True, "ray://h:1")
    quiet = build_parser().parse_args(["run", str(tmp_path / "p.yaml")])
    assert pipeline_from_args(quiet).ray.verbose is False


def test_which_stages_want_rays_dashboard():
    """Ray Train's TorchTrainer wants the dashboard; Ray Data and in-process trials do not."""
    def config(*argv):
        return resolve_config(build_parser().parse_args(list(argv)))

    assert not VERBS["infer"].dashboard(config("infer"))
    assert VERBS["train"].dashboard(config("train"))
    assert not VERBS["train"].dashboard(config("train", "scaling.num_workers=0"))
    assert not VERBS["tune"].dashboard(config("tune", "store.uri=s"))
    assert VERBS["tune"].dashboard(config("tune", "store.uri=s", "tune.trial_mode=trainer"))
