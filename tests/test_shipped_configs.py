"""Every shipped config opens with the command that runs it and loads into its dataclasses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from still.config import load_config
from still.errors import StillError
from still_cli.pipeline import check_pipeline, parse_pipeline
from student_train.config import TrainConfig
from teacher_infer.config import InferConfig
from tuning.config import TuneConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
VERB_CONFIGS = {"infer": InferConfig, "train": TrainConfig, "tune": TuneConfig}
RUN_LINE = re.compile(r"^# Run: still (infer|train|tune|run) ")


def test_configs_are_shipped():
    names = {path.name for path in CONFIGS}
    assert {"mnist.yaml", "fashion-mnist.yaml", "fashion-mnist-hints.yaml", "transfer.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_opens_with_its_command_and_loads(path):
    first = path.read_text().splitlines()[0]
    match = RUN_LINE.match(first)
    assert match, f"{path.name} must open with '# Run: still VERB ...', got {first!r}"
    verb = match.group(1)
    assert str(Path("configs") / path.name) in first
    if verb == "run":
        for fast in (False, True):
            pipeline = parse_pipeline(str(path), fast=fast)
            check_pipeline(pipeline)
            assert "train" in {stage.verb for stage in pipeline.stages}
    else:
        load_config(VERB_CONFIGS[verb], path)


def test_main_job_compares_students_fairly():
    """Baseline and distilled student: same architecture, views, epochs, schedule and seed."""
    pipeline = parse_pipeline(str(Path(CONFIGS[0]).parent / "mnist.yaml"))
    stages = {stage.name: stage.config for stage in pipeline.stages}
    assert stages["teacher"]["student"]["width"] == 1200 and stages["teacher"]["train"]["augment"] == {"jitter": 2}
    store = stages["store"]["store"]
    assert store["views"] > 1 and store["augment"] == {"jitter": 2} and "views" not in stages["store_single_view"]
    students = [stages[name] for name in ("baseline", "distilled", "distilled_single_view")]
    assert all(s["student"] == students[0]["student"] and s["train"]["epochs"] == students[0]["train"]["epochs"]
               and s["train"]["seed"] == students[0]["train"]["seed"]
               and s["train"]["lr_schedule"] == students[0]["train"]["lr_schedule"] for s in students)
    assert stages["baseline"]["store"] == stages["distilled"]["store"] == {"uri": "${store.store}"}
    assert stages["baseline"]["kd"]["weight"] == 0 < stages["distilled"]["kd"]["weight"]
    assert stages["distilled_single_view"]["kd"] == stages["distilled"]["kd"]
    assert set(pipeline.summary) >= {"teacher_errors", "baseline_errors", "distilled_errors",
                                     "distilled_single_view_errors", "best_sweep_errors", "bytes_per_row"}
    assert (pipeline.reference["teacher_errors"], pipeline.reference["baseline_errors"],
            pipeline.reference["distilled_errors"]) == (67, 146, 74)


def test_paper_config_follows_the_paper():
    """configs/mnist-paper.yaml keeps Hinton et al.'s architectures, regularisation and T = 20."""
    stages = {stage.name: stage.config for stage in parse_pipeline(str(Path(CONFIGS[0]).parent /
                                                                       "mnist-paper.yaml")).stages}
    assert stages["teacher"]["student"] == {"family": "mlp", "width": 1200, "depth": 2, "dropout": 0.5,
                                            "input_dropout": 0.2}
    assert stages["teacher"]["train"]["augment"] == {"jitter": 2}
    assert stages["baseline"]["student"] == stages["distilled"]["student"] == {"family": "mlp", "width": 800,
                                                                               "depth": 2}
    assert stages["distilled"]["kd"]["temperature"] == 20.0 and stages["baseline"]["kd"]["weight"] == 0


def test_misspelled_key_in_a_pipeline_stage_fails_before_any_stage_runs(tmp_path):
    text = (CONFIGS[0].parent / "mnist.yaml").read_text().replace("dtype: float16", "dtpye: float16")
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.raises(StillError, match=r"pipeline stage 'store': unknown config key 'store.dtpye'"):
        check_pipeline(parse_pipeline(str(path)))


def _stages(name):
    pipeline = parse_pipeline(str(Path(CONFIGS[0]).parent / name))
    return pipeline, {stage.name: stage.config for stage in pipeline.stages}


def test_hint_config_compares_a_hinted_student_with_a_logits_only_one():
    pipeline, stages = _stages("fashion-mnist-hints.yaml")
    assert stages["teacher"]["student"] == {"family": "cnn", "width": 1.0}
    assert stages["store"]["teacher"]["feature_layers"] == ["pool2", "features"]
    hinted, plain = stages["hinted"], stages["logits_only"]
    assert hinted["student"] == plain["student"] and hinted["train"]["epochs"] == plain["train"]["epochs"]
    assert hinted["student"]["width"] < stages["teacher"]["student"]["width"]
    assert {k: v for k, v in hinted["kd"].items() if k not in ("hints", "hint_weight")} == plain["kd"]
    assert hinted["kd"]["hints"] == ["pool2", "features"] and hinted["kd"]["hint_weight"] > 0
    assert 0.0 in stages["sweep"]["space"]["hint_weight"] and len(stages["sweep"]["space"]["hint_weight"]) > 1


def test_transfer_config_adapts_a_mnist_teacher_and_compares_with_scratch():
    pipeline, stages = _stages("transfer.yaml")
    assert stages["mnist_teacher"]["data"] == {"source": "builtin:mnist"}
    assert stages["scratch"]["data"] == stages["head"]["data"] == {"source": "builtin:fashion-mnist"}
    assert stages["head"]["student"]["init"] == "${mnist_teacher.checkpoint}"
    assert stages["head"]["train"]["freeze"] == ["body.*"]
    assert stages["fine_tuned"]["student"]["init"] == "${head.checkpoint}"
    assert "freeze" not in stages["fine_tuned"]["train"]
    assert stages["fine_tuned"]["train"]["lr_groups"] == ["head.*=10"]
    epochs = {name: stages[name]["train"]["epochs"] for name in ("head", "fine_tuned", "scratch")}
    assert epochs["scratch"] == epochs["head"] + epochs["fine_tuned"]
    assert "init" not in stages["scratch"]["student"]
    assert stages["store"]["teacher"]["uri"] == "${fine_tuned.checkpoint}"
    assert stages["distilled"]["store"] == {"uri": "${store.store}"}
