"""Hint (feature) distillation on several layers, and transfer learning (init, freeze, lr groups).

End to end through ``still run``: a CNN teacher's conv and hidden layers are stored,
a smaller CNN student is distilled with and without hints, and a sweep turns the hint
weight. Bad input: unknown layers on either side, shapes no projector maps, freeze
patterns that match nothing, an init of another family or width.
"""

from __future__ import annotations

import dataclasses

import json

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from _teacher_fixtures import mnist_digits, still_in_process, summary_json
from still.checkpoints import save_checkpoint
from still.config import load_config
from still.errors import StillError
from still.models import build_model
from student_train.config import TrainConfig
from student_train.driver import JobOptions, prepare_job, train_job
from student_train.hints import make_projector, plan_hints
from student_train.transfer import check_patterns, load_init_state, parameter_groups
from teacher_infer.store import StoredFeature

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def digits_28(tmp_path_factory):
    """3,000 MNIST digits as a Parquet dataset with a (1, 28, 28) tensor column."""
    ids, pixels, labels = mnist_digits(3000)
    path = tmp_path_factory.mktemp("digits28") / "digits.parquet"
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(pixels.reshape(-1, *SHAPE))
    pq.write_table(pa.table({"id": ids, "features": tensor, "label": labels}), path)
    return path


# --------------------------------------------------------------------------- end to end


@pytest.mark.timeout(600)
def test_cli_pipeline_distills_with_hints_on_two_layers(ray_cluster, digits_28, tmp_path):
    student = {"family": "cnn", "width": 0.25}
    train = {"epochs": 3, "lr": 0.003, "seed": 0}
    pipeline = {
        "name": "hints-test",
        "defaults": {"data": {"source": str(digits_28)}},
        "stages": [
            {"name": "teacher", "verb": "train", "config": {
                "student": {"family": "cnn", "width": 0.5}, "train": {"epochs": 4, "lr": 0.003},
                "scaling": {"num_workers": 0}}},
            {"name": "store", "verb": "infer", "config": {
                "teacher": {"uri": "${teacher.checkpoint}", "feature_layers": ["pool2", "features"]},
                "store": {"mode": "topk", "k": 3, "dtype": "float16", "root": str(tmp_path / "stores")}}},
            {"name": "logits", "verb": "train", "config": {
                "store": {"uri": "${store.store}"}, "student": student, "kd": {"temperature": 4.0, "weight": 0.7},
                "train": {**train, "name": "logits-only"}, "scaling": {"num_workers": 0}}},
            {"name": "hinted", "verb": "train", "config": {
                "store": {"uri": "${store.store}"}, "student": student,
                "kd": {"temperature": 4.0, "weight": 0.7, "hint_weight": 0.05, "hints": ["pool2", "features"]},
                "train": {**train, "name": "hinted"}, "scaling": {"num_workers": 2}}},
            {"name": "probe", "verb": "train", "config": {  # transfer from the teacher's MLflow model
                "student": {"family": "cnn", "width": 0.5, "init": "${teacher.model_uri}"},
                "train": {"epochs": 1, "lr": 0.003, "freeze": ["body.*"], "name": "probe"},
                "scaling": {"num_workers": 0}}},
        ],
        "summary": {"logits_errors": "logits.test_errors", "hinted_errors": "hinted.test_errors"},
    }
    path = tmp_path / "hints.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    result = still_in_process(["run", str(path), "--json"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = summary_json(result)

    store = json.loads((tmp_path / "stores" / out["store"]["key"] / "manifest.json").read_text())
    assert store["storage"]["feature_shapes"] == {"pool2": [32, 7, 7], "features": [64]}
    assert "features_pool2" in store["columns"] and "features_features" in store["columns"]

    hinted, logits = out["hinted"]["history"], out["logits"]["history"]
    # the hint terms are there per layer, fall, and change what the student learns
    assert [set(h) >= {"train_hint", "train_hint_pool2", "train_hint_features"} for h in hinted] == [True] * 3
    assert hinted[-1]["train_hint_pool2"] < 0.7 * hinted[0]["train_hint_pool2"]
    assert hinted[-1]["train_hint_features"] < 0.7 * hinted[0]["train_hint_features"]
    assert hinted[0]["train_hint"] == pytest.approx(hinted[0]["train_hint_pool2"] + hinted[0]["train_hint_features"])
    assert all(h["train_hint"] == 0.0 for h in logits)
    assert hinted[-1]["train_kl"] != pytest.approx(logits[-1]["train_kl"], rel=1e-3)
    assert out["hinted"]["student_test_accuracy"] > 0.7 and out["logits"]["student_test_accuracy"] > 0.7

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.get_run(out["hinted"]["run_id"])
    assert run.data.params["hint.pool2"] == "(16, 7, 7) -> (32, 7, 7)"
    assert run.data.params["kd.hints"] == "['pool2', 'features']"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_hint_pool2")
    assert [m.step for m in history] == [1, 2, 3]

    probe = out["probe"]
    assert probe["init"]["source"] == out["teacher"]["model_uri"] and probe["init"]["reinitialized"] == []
    assert probe["student_test_accuracy"] > 0.9  # the teacher's own backbone and head, head trained on
    params = mlflow.get_run(probe["run_id"]).data.params
    assert params["train.freeze"] == "['body.*']" and params["frozen_params"] == "6"
    assert params["init.source"] == out["teacher"]["model_uri"] and params["init.reinitialized"] == "none"



# --------------------------------------------------------------------------- hints: units and bad input


def _stored(**shapes):
    return [StoredFeature(layer, f"features_{layer}", tuple(shape)) for layer, shape in shapes.items()]


def test_projectors_map_vectors_and_same_size_maps_only():
    assert isinstance(make_projector((16,), (64,), "a:b"), torch.nn.Linear)
    conv = make_projector((8, 7, 7), (32, 7, 7), "a:b")
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1)
    assert conv(torch.zeros(2, 8, 7, 7)).shape == (2, 32, 7, 7)
    for student, teacher in (((8, 14, 14), (32, 7, 7)), ((16,), (32, 7, 7)), ((8, 7, 7), (64,))):
        with pytest.raises(StillError, match=r"kd.hints conv2:pool2: no projector maps the student's "):
            make_projector(student, teacher, "conv2:pool2")


def test_plan_hints_names_the_layers_either_side_has():
    student = build_model("cnn", input_shape=SHAPE, num_classes=10, width=0.25)
    stored = _stored(pool2=(32, 7, 7), features=(64,))
    pairs = plan_hints(["pool2", "features"], 1.0, student, SHAPE, stored, "s")
    assert [(p.student_shape, p.teacher_shape) for p in pairs] == [((16, 7, 7), (32, 7, 7)), ((32,), (64,))]
    assert plan_hints(["pool2"], 0.0, student, SHAPE, stored, "s") == ()  # β = 0: a sweep's baseline
    with pytest.raises(StillError, match=r"kd.hints: CNN has no layer 'conv9'; its layers: conv1, pool1, conv2, "
                                         r"pool2, features \(or any submodule name\)"):
        plan_hints(["conv9:pool2"], 1.0, student, SHAPE, stored, "s")
    with pytest.raises(StillError, match=r"the store 's' has no teacher layer 'conv2'; its layers: pool2, features"):
        plan_hints(["conv2"], 1.0, student, SHAPE, stored, "s")
    with pytest.raises(StillError, match=r"kd.hints conv2:pool2: no projector maps the student's \(16, 14, 14\) "
                                         r"to the teacher's \(32, 7, 7\)"):
        plan_hints(["conv2:pool2"], 1.0, student, SHAPE, stored, "s")
    with pytest.raises(StillError, match="has none"):
        plan_hints(["pool2"], 1.0, student, SHAPE, [], "s")
    with pytest.raises(StillError, match="kd.hint_weight > 0 needs kd.hints"):
        plan_hints([], 1.0, student, SHAPE, stored, "s")


@dataclasses.dataclass(frozen=True)
class _FakeDataset:
    """What Source.row_bytes reads of a dataset: its shape, classes and task."""

    input_shape: tuple = SHAPE
    num_classes: int = 10
    task: str = "multiclass"


def test_a_student_reads_only_the_stored_layers_its_hints_use():
    from student_train.data import Source
    from student_train.hints import keep_hinted_layers

    source = Source(dataset=_FakeDataset(), features=tuple(_stored(pool2=(32, 7, 7), features=(64,))))
    assert [f.layer for f in keep_hinted_layers(source, ["features"]).features] == ["features"]
    assert keep_hinted_layers(source, []).features == ()  # logits only: no feature column is read
    assert source.row_bytes() - keep_hinted_layers(source, []).row_bytes() == 4 * (32 * 7 * 7 + 64)
    assert keep_hinted_layers(source, ["conv9"]) is source  # left whole, for plan_hints to list the layers


def test_hinted_student_captures_its_layers_before_dropout():
    from student_train.hints import HintPair, HintedStudent

    student = build_model("cnn", input_shape=SHAPE, num_classes=10, width=0.25, dropout=0.5).train()
    pairs = [HintPair("pool2", "pool2", (16, 7, 7), (32, 7, 7)), HintPair("features", "f", (32,), (64,))]
    net = HintedStudent(student, pairs).train()
    x = torch.randn(8, *SHAPE)
    (logits_a, projected_a), (logits_b, projected_b) = net(x), net(x)
    assert [p.shape for p in projected_a] == [(8, 32, 7, 7), (8, 64)]
    assert not torch.equal(logits_a, logits_b)  # dropout acts before the head...
    for a, b in zip(projected_a, projected_b):  # ...and not on the layers the hints match
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(projected_a[1], net.projectors[1](student.features(x)))


def test_bad_hint_and_lr_group_entries_fail_at_config_time():
    for override, message in (("kd.hints=[a:b:c]", "kd.hints: 'a:b:c' is not"),
                              ("train.lr_groups=[head.*]", "train.lr_groups: 'head.\\*' is not 'pattern=factor'"),
                              ("train.lr_groups=[head.*=-1]", "factor > 0")):
        with pytest.raises(StillError, match=message):
            load_config(TrainConfig, None, [override])


def test_a_hint_on_a_store_without_that_layer_fails_before_training(digits_store, tmp_path):
    cfg = load_config(TrainConfig, None, [f"store.uri={digits_store}", "kd.hint_weight=1", "kd.hints=[features]",
                                          "tracking.enabled=false", f"train.output_dir={tmp_path / 'out'}"])
    with pytest.raises(StillError, match=r"kd.hints needs a store with teacher layers; .* has none \(write one "
                                         r"with still infer teacher.feature_layers=\[<layer>, ...\]\)"):
        prepare_job(cfg, "x", JobOptions())
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- transfer


def _checkpoint(path, family, shape, classes, names, **args):
    torch.manual_seed(1)
    model_args = {"input_shape": list(shape), "num_classes": classes, **args}
    model = build_model(family, **model_args)
    save_checkpoint(str(path), model, family, model_args, {"class_names": names})
    return model


def test_init_reinitialises_a_head_of_other_classes_and_refuses_other_models(tmp_path):
    digits = [str(i) for i in range(10)]
    garments = ["T-shirt/top", "Trouser"] + [f"g{i}" for i in range(8)]
    source = _checkpoint(tmp_path / "mnist.pt", "cnn", SHAPE, 10, digits, width=0.25)
    args = {"input_shape": SHAPE, "num_classes": 10, "width": 0.25}

    state, report = load_init_state(str(tmp_path / "mnist.pt"), "cnn", args, digits)
    assert report["reinitialized"] == [] and set(state) == set(source.state_dict())
    state, report = load_init_state(str(tmp_path / "mnist.pt"), "cnn", args, garments)
    assert report["reinitialized"] == ["head.weight", "head.bias"] and "head.weight" not in state
    assert "the init's classes (0, 1, 2, ...) are not this data's (T-shirt/top, Trouser, g0, ...)" == report["reason"]
    torch.testing.assert_close(state["body.0.weight"], source.state_dict()["body.0.weight"])
    _, kept = load_init_state(str(tmp_path / "mnist.pt"), "cnn", args, garments, head_policy="keep")
    assert kept["reinitialized"] == []
    _, three = load_init_state(str(tmp_path / "mnist.pt"), "cnn", {**args, "num_classes": 3}, garments[:3])
    assert three["reason"] == "the init has 10 classes, this student 3"
    with pytest.raises(StillError, match=r"head.bias is \(10,\) there, \(3,\) here; re-initialise the head with "
                                         r"student.init_head=auto or reinit"):
        load_init_state(str(tmp_path / "mnist.pt"), "cnn", {**args, "num_classes": 3}, garments[:3], head_policy="keep")

    _checkpoint(tmp_path / "mlp.pt", "mlp", SHAPE, 10, digits, width=32, depth=1)
    with pytest.raises(StillError, match=r"student.init .*mlp.pt' is a mlp model; student.family=cnn"):
        load_init_state(str(tmp_path / "mlp.pt"), "cnn", args, digits)
    with pytest.raises(StillError, match=r"does not fit the cnn student: body.0.weight is \(8, 1, 3, 3\) there, "
                                         r"\(16, 1, 3, 3\) here"):
        load_init_state(str(tmp_path / "mnist.pt"), "cnn", {**args, "width": 0.5}, digits)


def test_freeze_and_lr_group_patterns_must_match_a_parameter():
    student = build_model("cnn", input_shape=SHAPE, num_classes=10, width=0.25)
    check_patterns(student, ["body.*"], ["head.*=10"])
    with pytest.raises(StillError, match=r"train.freeze: pattern 'backbone.\*' matches no student parameter; "
                                         r"the parameters: body.0.weight, body.0.bias"):
        check_patterns(student, ["backbone.*"], [])
    with pytest.raises(StillError, match=r"train.lr_groups: pattern 'heads.\*' matches no student parameter"):
        check_patterns(student, [], ["heads.*=10"])
    with pytest.raises(StillError, match="freezes every student parameter"):
        check_patterns(student, ["*"], [])
    groups = parameter_groups(student, torch.nn.Linear(2, 2), ["head.*=10", "body.0.*=0.5"])
    assert [(g["name"], g["lr_scale"], len(g["params"])) for g in groups] == [
        ("head.*", 10.0, 2), ("body.0.*", 0.5, 2), ("default", 1.0, 4), ("projectors", 1.0, 2)]


def test_fine_tuning_with_a_frozen_backbone_trains_only_the_head(digits_28, tmp_path):
    source = _checkpoint(tmp_path / "other.pt", "cnn", SHAPE, 10, [f"c{i}" for i in range(10)], width=0.25)
    cfg = load_config(TrainConfig, None, [
        f"data.source={digits_28}", "student.family=cnn", "student.width=0.25", f"student.init={tmp_path / 'other.pt'}",
        "train.freeze=[body.*]", "train.lr_groups=[head.*=10]", "train.lr=0.001", "train.epochs=2",
        "scaling.num_workers=0", "tracking.enabled=false", f"train.output_dir={tmp_path / 'out'}"])
    out = train_job(cfg, run_name="frozen", options=JobOptions(quiet=True))
    assert out["init"]["reinitialized"] == ["head.weight", "head.bias"]
    trained = torch.load(out["checkpoint"], weights_only=True)
    for name, value in source.state_dict().items():
        same = torch.equal(trained["state_dict"][name], value)
        assert same == name.startswith("body."), name  # the backbone is the init's, bit for bit; the head moved
    # a linear probe on an untrained backbone's features: far from a trained CNN, well above chance (0.1)
    assert out["student_test_accuracy"] > 0.2
    assert np.isfinite(out["history"][-1]["train_loss"])
