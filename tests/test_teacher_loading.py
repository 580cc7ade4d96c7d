"""Teachers from all four forms, fingerprints, and TeacherPredictor on plain numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _teacher_fixtures import train_digits_teacher
from still.checkpoints import load_checkpoint
from still.errors import StillError
from still.datasets import Normalisation
from teacher_infer.predictor import TeacherPredictor
from teacher_infer.teachers import load_teacher, teacher_fingerprint


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    return train_digits_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt", steps=50)


def _reference(ckpt, x):
    model, _ = load_checkpoint(str(ckpt))
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_checkpoint_torchscript_export_forms(teacher_ckpt, tmp_path):
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    expected = _reference(teacher_ckpt, x)
    teacher = load_teacher(str(teacher_ckpt))
    assert teacher.form == "checkpoint" and len(teacher.fingerprint) == 64
    assert teacher_fingerprint(str(teacher_ckpt)) == teacher.fingerprint
    model, _ = load_checkpoint(str(teacher_ckpt))
    scripted = tmp_path / "teacher.ts"
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 64)), str(scripted))
    exported = tmp_path / "teacher.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(2, 64),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)),
                      str(exported))
    for path, form in ((scripted, "torchscript"), (exported, "export")):
        loaded = load_teacher(str(path))
        assert loaded.form == form
        with torch.no_grad():
            np.testing.assert_allclose(loaded.model(torch.from_numpy(x)).numpy(), expected, rtol=1e-5, atol=1e-5)
        # the same weights and architecture in a renamed copy: same fingerprint
        copy = tmp_path / f"copy-{path.name}"
        copy.write_bytes(path.read_bytes())
        assert load_teacher(str(copy)).fingerprint == loaded.fingerprint
        # payload round trip (what Ray workers get)
        with torch.no_grad():
            np.testing.assert_allclose(loaded.payload().load()(torch.from_numpy(x)).numpy(), expected, atol=1e-5)


def test_mlflow_runs_and_models_alias(teacher_ckpt, tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # set the global tracking URI in a way that is undone after the test
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
    mlflow.set_experiment("teachers")
    model, _ = load_checkpoint(str(teacher_ckpt))
    # MLflow 3 saves torch models as pt2 by default; a batch of 2 keeps the batch dim dynamic
    example = np.zeros((2, 64), dtype=np.float32)
    with mlflow.start_run() as run:
        info = mlflow.pytorch.log_model(model, name="teacher", input_example=example,
                                        registered_model_name="digits-teacher", pip_requirements=["torch"])
    mlflow.MlflowClient(uri).set_registered_model_alias("digits-teacher", "champion", info.registered_model_version)
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    expected = _reference(teacher_ckpt, x)
    fingerprints = set()
    for model_uri in (f"runs:/{run.info.run_id}/teacher", "models:/digits-teacher@champion"):
        loaded = load_teacher(model_uri)
        assert loaded.form == "mlflow"
        with torch.no_grad():
            np.testing.assert_allclose(loaded.model(torch.from_numpy(x)).numpy(), expected, atol=1e-5)
            np.testing.assert_allclose(loaded.payload().load()(torch.from_numpy(x)).numpy(), expected, atol=1e-5)
        fingerprints.add(loaded.fingerprint)
    assert len(fingerprints) == 1
    with pytest.raises(StillError, match="models:/digits-teacher@nope"):
        load_teacher("models:/digits-teacher@nope")


def test_not_a_model(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(StillError, match=r"notes\.txt.*is not a model"):
        load_teacher(str(junk))
    with pytest.raises(StillError, match="does not exist"):
        load_teacher(str(tmp_path / "missing.pt"))


def test_predictor_on_numpy(teacher_ckpt):
    teacher = load_teacher(str(teacher_ckpt))
    raw = np.random.default_rng(2).integers(0, 17, (20, 64)).astype(np.uint8)
    expected = _reference(teacher_ckpt, raw.astype(np.float32) / 16)
    norm = Normalisation((64,), 1 / 16)
    predictor = TeacherPredictor(teacher.payload(), norm, batch_size=7)  # 3 forward passes, uint8 rows in
    logits, feats = predictor.forward(raw)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert logits.dtype == np.float32 and feats == {}
    hooked = TeacherPredictor(teacher, norm, feature_layers=("body", "features"))
    _, feats = hooked.forward(raw)
    assert {name: value.shape for name, value in feats.items()} == {"body": (20, 64), "features": (20, 64)}
    np.testing.assert_allclose(feats["features"], feats["body"], rtol=1e-5, atol=1e-5)  # the body ends in it
    hooked.close()
    scripted = torch.jit.script(teacher.model)  # no hooks on TorchScript: its features() method instead
    _, by_method = TeacherPredictor(scripted, norm, feature_layers=("features",)).forward(raw)
    np.testing.assert_allclose(by_method["features"], feats["body"], rtol=1e-5, atol=1e-5)
    # bf16 autocast: same argmax on a confident teacher, logits within bf16's 3 significant digits
    low, _ = TeacherPredictor(teacher, norm, precision="bf16").forward(raw)
    assert (low.argmax(1) == expected.argmax(1)).mean() >= 0.95
    np.testing.assert_allclose(low, expected, rtol=0.05, atol=0.05 * np.abs(expected).max())
    assert not np.array_equal(low, logits)
    with pytest.raises(StillError, match=r"teacher.feature_layers: MLP has no layer 'nope'; its layers: "
                                         r"hidden1, features \(or any submodule name\)"):
        TeacherPredictor(teacher, norm, feature_layers=("nope",))


def test_normalisation_mean_std():
    norm = Normalisation((3, 2, 2), 1 / 255, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    raw = np.full((1, 12), 255, dtype=np.uint8)
    raw[0, 4:8] = 0
    x = norm.apply_numpy(raw)
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [1.0, -1.0, 1.0])


def test_torchscript_teacher_with_batchnorm(tmp_path):
    """BatchNorm's 0-dim ``num_batches_tracked`` buffer enters the fingerprint (it once failed to)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(10)).eval()
    model(torch.zeros(1, 3, 8, 8))
    path = tmp_path / "bn.pt"
    torch.jit.script(model).save(str(path))
    first = teacher_fingerprint(str(path))
    assert first == teacher_fingerprint(str(path)) and len(first) == 64
    with torch.no_grad():
        model[1].num_batches_tracked.fill_(7)
    torch.jit.script(model).save(str(path))
    assert teacher_fingerprint(str(path)) != first
