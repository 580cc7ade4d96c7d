"""still tune without Ray: config, search space, up-front checks, report, trial names."""

from __future__ import annotations

import dataclasses

import json
import os

import pytest

from _teacher_fixtures import write_small_store
from still.config import load_config
from still.errors import StillError
from tuning import space as sp
from student_train.config import TrainConfig
from tuning.config import TuneConfig
from tuning.console import error_line, run_config_verbosity, trial_line, tune_output
from tuning.driver import pick_best, plan_sweep
from tuning.report import format_table, pareto_front, plot_pareto
from tuning.trainable import TrialNamer, TrialSpec, trial_train_config

STORE = "stores/x"


def _cfg(*overrides, store=STORE):
    return load_config(TuneConfig, None, [f"store.uri={store}", *overrides])


def _tiny_store(directory):
    return write_small_store(directory)[0]


# ------------------------------------------------------------------ config


def test_defaults_and_sections():
    # every section of a student's config can be set for a sweep's trials
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= {f.name for f in dataclasses.fields(TuneConfig)}
    cfg = _cfg()
    assert cfg.tune.searcher == "random" and cfg.tune.metric == "val_accuracy"
    assert cfg.tune.resolved_mode == "max" and _cfg("tune.metric=val_nll").tune.resolved_mode == "min"
    assert cfg.tune.trial_mode == "in_process" and cfg.scaling.num_workers == (1,)
    assert cfg.sweep_name.startswith("sweep-") and cfg.sweep_name == _cfg("tune.resume=true").sweep_name
    assert cfg.sweep_name != _cfg("space.width=[8]").sweep_name
    assert _cfg("tune.name=abc").output_dir == "runs/tune-abc"
    assert cfg.base_train_config().kd.temperature == cfg.kd.temperature


@pytest.mark.parametrize(
    "override, message",
    [
        ("tune.searcher=bayes", "tune.searcher must be one of 'grid', 'random', 'optuna'; got 'bayes'"),
        ("tune.metric=val_f1", "tune.metric must be one of val_accuracy, val_nll, val_ce; got 'val_f1'"),
        ("tune.num_samples=0", "tune.num_samples must be >= 1, got 0"),
        ("tune.reduction_factor=1", "tune.reduction_factor must be > 1"),
        ("tune.grace_period=20", "tune.grace_period (20) must be <= train.epochs (10)"),
        ("scaling.num_workers=2", "needs tune.trial_mode=trainer"),
        ("tune.nmu_samples=3", "unknown config key 'tune.nmu_samples'"),
        ("space.heads=[1]", "unknown config key 'space.heads'"),
    ],
)
def test_bad_tune_keys(override, message):
    with pytest.raises(StillError, match=None) as info:
        _cfg(override)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_scaling_overrides_keep_one_worker_per_trial():
    config = load_config(TuneConfig, None, ["store.uri=s", "scaling.use_gpu=true"])
    assert config.scaling.num_workers == (1,) and config.scaling.use_gpu is True


def test_store_is_required():
    with pytest.raises(StillError, match="store.uri is required"):
        load_config(TuneConfig, None, [])


# ------------------------------------------------------------------ space


@pytest.mark.parametrize(
    "override, message",
    [
        ("space.temperature=[]", "space.temperature is an empty list"),
        ("space.temperature={low: 5, high: 1}", "space.temperature: low must be < high, got low=5 high=1"),
        ("space.weight={low: 0.5, high: 0.5}", "space.weight: low must be < high"),
        ("space.lr={low: 0, high: 0.1, log: true}", "space.lr: bounds must be > 0, got 0"),
        ("space.weight=[0.5, 1.5]", "space.weight values must be in [0, 1], got 1.5"),
        ("space.width={low: 8}", "space.width: a range needs both low and high"),
        ("space.width={lo: 8, high: 9}", "space.width: unknown range key 'lo'"),
        ("space.temperature=[1, 1]", "space.temperature lists a value twice"),
        ("space.temperature=hot", "space.temperature must be a list of values or a range"),
        ("space.hint_weight=[0, -0.1]", "space.hint_weight values must be >= 0, got -0.1"),
        ("space.depth=[2, 1.5]", "space.depth values must be a whole number >= 1, got 1.5"),
        ("space.divergence=[forward, backward]", "space.divergence: 'backward' is not one of forward, reverse, jsd"),
        ("space.divergence={low: 0, high: 1}", "space.divergence must be a list of names"),
        ("space.divergence=[jsd, jsd]", "space.divergence lists a value twice"),
    ],
)
def test_bad_space(override, message):
    cfg = _cfg(override)
    with pytest.raises(StillError) as info:
        sp.resolve_space(cfg.space, cfg.tune.searcher, cfg.student.family)
    assert message in str(info.value)


def test_grid_needs_lists():
    cfg = _cfg("tune.searcher=grid", "space.temperature={low: 1, high: 4}")
    with pytest.raises(StillError, match="tune.searcher=grid needs a list"):
        sp.resolve_space(cfg.space, "grid", "mlp")


def test_space_resolution_and_tune_objects():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer

    cfg = _cfg("space.temperature={low: 1, high: 20, log: true}", "space.width={low: 16, high: 64}",
               "space.weight=[0.5, 0.9]")
    dims = sp.resolve_space(cfg.space, "random", "mlp")
    assert list(dims) == ["temperature", "weight", "width"]  # lr not swept by default
    assert dims["width"].integer and not dims["temperature"].integer and dims["temperature"].log
    space = sp.param_space(dims, "random")
    assert isinstance(space["temperature"], Float) and isinstance(space["width"], Integer)
    assert isinstance(space["weight"], Categorical)
    assert space["width"].upper == 65  # randint excludes its upper bound; width ranges include it
    grid = sp.param_space(sp.resolve_space(_cfg().space, "grid", "mlp"), "grid")
    assert grid["temperature"] == tune.grid_search([1.0, 2.0, 4.0, 8.0])
    assert sp.num_trials(sp.resolve_space(_cfg().space, "grid", "mlp"), "grid", 2) == 2 * 4 * 3 * 4
    assert sp.resolve_space(_cfg("student.family=cnn").space, "random", "cnn")["width"].values == (0.25, 0.5, 1.0)
    assert sp.num_trials(dims, "optuna", 7) == 7
    hinted = sp.resolve_space(_cfg("space.hint_weight=[0, 0.1]").space, "grid", "mlp")
    assert hinted["hint_weight"].values == (0.0, 0.1) and sp.CONFIG_KEYS["hint_weight"] == "kd.hint_weight"
    divergences = sp.resolve_space(_cfg("space.divergence=[forward, jsd]").space, "grid", "mlp")["divergence"]
    assert divergences.values == ("forward", "jsd") and divergences.describe() == "[forward, jsd]"
    assert sp.param_space({"divergence": divergences}, "grid")["divergence"] == tune.grid_search(["forward", "jsd"])


def test_searchers_build():
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    assert isinstance(sp.build_search_alg("random", seed=0, max_concurrent=2), BasicVariantGenerator)
    assert isinstance(sp.build_search_alg("optuna", seed=0, max_concurrent=2), ConcurrencyLimiter)
    with pytest.raises(StillError, match="tune.searcher must be one of"):
        sp.build_search_alg("bayes", seed=0, max_concurrent=0)


# ------------------------------------------------------------------ up-front checks


def test_plan_checks_store_before_any_trial(tmp_path):
    good = _tiny_store(tmp_path / "store")
    plan = plan_sweep(_cfg(f"tune.output_dir={tmp_path / 'out'}", store=good))
    assert plan.store_key == "k" * 16 and plan.input_shape == (4,) and plan.num_classes == 5
    assert plan.num_trials == 8 and plan.metric == "val_accuracy" and plan.mode == "max"
    with pytest.raises(StillError, match="does not exist"):
        plan_sweep(_cfg(store=str(tmp_path / "missing")))
    shard = tmp_path / "store" / "part-00000.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    plan_sweep(_cfg(store=good))  # same size, footer intact: the cheap check on open cannot see it
    with pytest.raises(StillError, match=r"fails verification: part-00000.parquet: checksum mismatch"):
        plan_sweep(_cfg("train.verify_store=true", store=good))
    shard.write_bytes(bytes(raw[:-100]))  # truncated: seen on every open
    with pytest.raises(StillError, match=r"shard part-00000.parquet has \d+ bytes, the manifest records"):
        plan_sweep(_cfg(store=good))


def test_plan_refuses_to_overwrite_a_sweep(tmp_path):
    good = _tiny_store(tmp_path / "store")
    (tmp_path / "out" / "trials" / "trial-0000").mkdir(parents=True)
    with pytest.raises(StillError, match="pass tune.resume=true"):
        plan_sweep(_cfg(f"tune.output_dir={tmp_path / 'out'}", store=good))
    plan_sweep(_cfg(f"tune.output_dir={tmp_path / 'out'}", "tune.resume=true", store=good))


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from still_cli.main import main

    good = _tiny_store(tmp_path / "store")
    code = main(["tune", f"store.uri={good}", "space.temperature={low: 4, high: 2}", "--retrain-best"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("still: error: space.temperature: low must be < high")


def test_cli_retrain_best_flag_sets_the_key():
    from still_cli.main import build_parser

    args = build_parser().parse_args(["tune", "store.uri=x", "--retrain-best", "--json"])
    assert args.retrain_best and args.json


# ------------------------------------------------------------------ report


ROWS = [
    {"trial": "trial-0000", "params": 1000, "val_accuracy": 0.90, "status": "completed"},
    {"trial": "trial-0001", "params": 2000, "val_accuracy": 0.85, "status": "completed"},  # dominated by 0
    {"trial": "trial-0002", "params": 4000, "val_accuracy": 0.95, "status": "stopped"},
    {"trial": "trial-0003", "params": 500, "val_accuracy": 0.70, "status": "completed"},
    {"trial": "trial-0004", "params": 1000, "val_accuracy": 0.90, "status": "completed"},  # tie with 0
    {"trial": "trial-0005", "params": 800, "val_accuracy": None, "status": "error"},
]


def test_pareto_front():
    assert pareto_front(ROWS) == [3, 0, 4, 2]
    assert pareto_front([]) == []


def test_pick_best_prefers_completed():
    assert pick_best(ROWS, "val_accuracy", "max") == 0
    assert pick_best(ROWS, "val_accuracy", "min") == 3
    assert pick_best([ROWS[2]], "val_accuracy", "max") == 0
    assert pick_best([ROWS[5]], "val_accuracy", "max") is None


def test_table_and_plot(tmp_path):
    table = format_table(ROWS, front=pareto_front(ROWS), best=0)
    lines = table.splitlines()
    assert len(lines) == 2 + len(ROWS) + 1
    assert lines[2].lstrip().startswith("B*") and "trial-0001" in lines[3] and "*" not in lines[3][:3]
    assert "lr" not in lines[0]
    png = plot_pareto(ROWS, tmp_path / "p.png", title="t", best=0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ trials


class _Trial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


def test_one_line_per_finished_trial(tmp_path):
    config = {"temperature": 20.0, "weight": 0.60791, "width": 400, "lr": None}
    line = trial_line("trial-0000", config, {"epochs": 4, "val_accuracy": 0.97755}, "completed")
    assert line == "still tune: trial-0000 completed after 4 epochs (T=20 λ=0.608 width=400), val acc 0.9776"
    stopped = trial_line("trial-0001", {"width": 100}, {"epoch": 1, "val_accuracy": 0.9}, "stopped early")
    assert stopped == "still tune: trial-0001 stopped early after 1 epoch (width=100), val acc 0.9000"
    (tmp_path / "error.txt").write_text("Traceback (most recent call last):\n  ...\nValueError: bad width\n")
    assert trial_line("trial-0002", {}, {}, f"failed: {error_line(tmp_path)}") == (
        "still tune: trial-0002 failed: ValueError: bad width")


def test_quiet_tune_selects_the_silent_output_engine_and_puts_it_back(monkeypatch):
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    assert (run_config_verbosity(False), run_config_verbosity(True)) == (0, None)
    with tune_output(verbose=False):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    with tune_output(verbose=True):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
    with tune_output(verbose=False):
        pass
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"


def test_trial_names_are_deterministic_and_resume_continues(tmp_path):
    import copy
    import pickle

    namer = TrialNamer(str(tmp_path))
    assert [namer(_Trial(i)) for i in ("a", "b", "a")] == ["trial-0000", "trial-0001", "trial-0000"]
    assert copy.deepcopy(namer)(_Trial("c")) == "trial-0002"  # copies share the count
    (tmp_path / "trial-0000").mkdir()
    (tmp_path / "experiment_state-x.json").write_text(json.dumps({"trials": ["trial-0003"]}))
    TrialNamer.forget(str(tmp_path))  # a resumed sweep recounts from disk
    assert pickle.loads(pickle.dumps(namer))(_Trial("d")) == "trial-0004"


def test_trial_train_config(tmp_path):
    from still.config import to_dict

    cfg = _cfg("kd.temperature=3")
    spec = TrialSpec(base=to_dict(cfg.base_train_config()), sweep_name="s", parent_run_id="p",
                     trial_mode="in_process", models_dir=str(tmp_path))
    trial = trial_train_config(spec, {"temperature": 7.0, "weight": 0.3, "width": 48, "divergence": "jsd"},
                               "trial-0002")
    assert (trial.kd.temperature, trial.kd.weight, trial.student.width) == (7.0, 0.3, 48)
    assert trial.kd.divergence == "jsd"
    assert trial.train.name == "s-trial-0002" and trial.scaling.num_workers == (0,)
    assert trial.train.output_dir == str(tmp_path / "trial-0002")
    hinted = TrialSpec(base=to_dict(_cfg("kd.hints=[pool2]").base_train_config()), sweep_name="s", parent_run_id="p",
                       trial_mode="in_process", models_dir=str(tmp_path))
    assert trial_train_config(hinted, {"hint_weight": 0.1}, "trial-0003").kd.hint_weight == 0.1
