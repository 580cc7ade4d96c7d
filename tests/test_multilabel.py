"""Multi-label distillation end to end through the CLI, on a real multi-label task.

``builtin:digits-overlay``: pairs of real handwritten digits overlaid into one image,
labelled with both digits (multi-hot). A teacher trained by ``still train`` on it
writes a dense ``task: multilabel`` store; a student distils from it with BCE.
"""

from __future__ import annotations


import mlflow
import pyarrow as pa
import pytest

from _teacher_fixtures import still_in_process, summary_json
from teacher_infer import store as st


@pytest.mark.timeout(400)
def test_multilabel_store_trains_a_student_end_to_end(ray_cluster, tmp_path):
    data = "data.source=builtin:digits-overlay"
    teacher = summary_json(still_in_process(
        ["train", data, "student.width=256", "kd.weight=0", "train.epochs=25", "train.lr=0.002",
         "scaling.num_workers=0", f"train.output_dir={tmp_path / 'teacher'}", "--json"], cwd=tmp_path))
    assert teacher["test_f1_micro"] > 0.75 and teacher["test_mean_ap"] > 0.85  # a real multi-label teacher

    infer = summary_json(still_in_process(
        ["infer", data, f"teacher.uri={teacher['checkpoint']}", "store.mode=dense",
         f"store.root={tmp_path / 'stores'}", "--json"], cwd=tmp_path))
    store = st.open_store(infer["store"])
    assert store.task == "multilabel" and store.num_classes == 10 and store.num_rows == 5391
    assert store.read_table(["label"]).schema.field("label").type == pa.list_(pa.int8(), 10)
    metrics = store.manifest["teacher_metrics"]
    assert metrics["per_split"]["test"]["f1_micro"] == pytest.approx(teacher["test_f1_micro"], abs=1e-6)
    assert infer["fidelity"]["4"]["kl_mean"] < 1e-5  # fp16 sigmoid logits, per-label binary KL

    student = summary_json(still_in_process(
        ["train", f"store.uri={infer['store']}", "student.width=32", "student.depth=1", "kd.weight=0.7",
         "kd.temperature=2", "train.epochs=20", "train.lr=0.003", "scaling.num_workers=0",
         f"train.output_dir={tmp_path / 'student'}", "--json"], cwd=tmp_path))
    history = student["history"]
    assert history[-1]["train_kl"] < 0.5 * history[0]["train_kl"]  # the binary KL to the teacher falls
    assert student["test_agreement"] > 0.9 and student["test_f1_micro"] > 0.7 and student["test_mean_ap"] > 0.8
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(student["run_id"])
    assert run.data.tags["store.key"] == store.key and "test_mean_ap" in run.data.metrics
