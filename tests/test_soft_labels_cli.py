"""Sparse stores end to end through the CLI: ``still infer`` → ``still store inspect`` → ``still train``.

The digits teacher (about 98% test accuracy, confident) writes an fp16 top-3 store and
a sampled store drawn at T_s = 4; students distil from each at T = 4 (k < C, T ≠ 1,
fp16, the non-default ``kd.tail=uniform`` for the top-k one).
"""

from __future__ import annotations


import mlflow
import pytest

from _teacher_fixtures import still_in_process, summary_json


@pytest.mark.timeout(400)
def test_topk_and_sampled_stores_train_students_from_the_cli(ray_cluster, tmp_path, digits_teacher):
    common = ["data.source=builtin:digits", f"teacher.uri={digits_teacher}", f"store.root={tmp_path / 'stores'}"]
    stores = {
        "topk": summary_json(still_in_process(["infer", *common, "store.mode=topk", "store.k=3",
                                        "store.dtype=float16", "--json"], cwd=tmp_path)),
        "sampled": summary_json(still_in_process(["infer", *common, "store.mode=sampled", "store.samples=16",
                                           "store.sample_temperature=4", "--json"], cwd=tmp_path)),
    }
    inspect = still_in_process(["store", "inspect", stores["topk"]["store"], "--json"], cwd=tmp_path)
    summary = summary_json(inspect)
    assert "fidelity: the stored target vs the full teacher output, on 1797 rows" in inspect.stdout
    assert summary["mode"] == "topk" and summary["k"] == 3 and summary["dtype"] == "float16"
    assert summary["fidelity"] == stores["topk"]["fidelity"]
    assert summary["fidelity"]["1"]["tail_mass_rel_err"] < 1e-4  # exact at T = 1 in fp16
    assert summary["temperatures"] == [1.0, 2.0, 4.0, 8.0]

    for mode, tail in (("topk", "uniform"), ("sampled", "bucket")):
        student = summary_json(still_in_process(
            ["train", f"store.uri={stores[mode]['store']}", "student.width=64", "student.depth=1",
             "kd.temperature=4", "kd.weight=0.7", f"kd.tail={tail}", "train.epochs=15", "train.lr=0.003",
             "scaling.num_workers=0", f"train.output_dir={tmp_path / mode}", "--json"], cwd=tmp_path))
        history = student["history"]
        assert history[-1]["train_kl"] < 0.5 * history[0]["train_kl"], mode  # the KL to the teacher falls
        assert student["student_test_accuracy"] > 0.9 and student["test_agreement"] > 0.9, (mode, student)
        run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(student["run_id"])
        assert run.data.params["kd.tail"] == tail and run.data.tags["store.key"] == stores[mode]["key"]
