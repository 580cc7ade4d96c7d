"""Training workers that cannot be scheduled fail fast with the key to change (no silent wait)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from student_train.capacity import misfit, worker_demand, workers_that_fit

TWO_NODES = [{"CPU": 2.0}, {"CPU": 2.0}]


def test_worker_demand_adds_a_gpu_and_custom_resources():
    assert worker_demand(1, 0, {}) == {"CPU": 1.0}
    assert worker_demand(0.5, 1, {"still_worker": 1}) == {"CPU": 0.5, "still_worker": 1.0, "GPU": 1.0}
    assert worker_demand(1, 0.25, {}) == {"CPU": 1.0, "GPU": 0.25}  # four small students share a GPU


@pytest.mark.parametrize(("strategy", "expected"), [("PACK", 4), ("SPREAD", 4), ("STRICT_PACK", 2),
                                                    ("STRICT_SPREAD", 2)])
def test_workers_that_fit_by_strategy(strategy, expected):
    assert workers_that_fit(TWO_NODES, {"CPU": 1.0}, strategy) == expected


def test_fractional_cpus_count_exactly():
    # 10 × 0.1 CPU on one CPU: floating point must not lose the tenth worker
    assert workers_that_fit([{"CPU": 1.0}], {"CPU": 0.1}, "PACK") == 10


@pytest.mark.parametrize(
    ("nodes", "demand", "strategy", "workers", "key"),
    [
        (TWO_NODES, {"CPU": 1.0, "GPU": 1.0}, "PACK", (2, 2), "scaling.use_gpu: 2 worker(s) × GPU=1 do not fit"),
        (TWO_NODES, {"CPU": 1.0, "still_worker": 1.0}, "PACK", (1, 1),
         "scaling.resources_per_worker.still_worker: 1 worker(s) × still_worker=1"),
        (TWO_NODES, {"CPU": 3.0}, "PACK", (1, 2), "scaling.cpus_per_worker: 1 worker(s) × CPU=3"),
        (TWO_NODES, {"CPU": 1.0}, "STRICT_SPREAD", (3, 3), "scaling.placement_strategy=STRICT_SPREAD: 3 worker(s)"),
        ([{"CPU": 2.0}, {"still_worker": 2.0}], {"CPU": 1.0, "still_worker": 1.0}, "PACK", (1, 1),
         "scaling: 1 worker(s) of {CPU=1, still_worker=1} do not fit the Ray cluster (2 node(s), CPU=2, "
         "still_worker=2): too few nodes carry all of it at once; at most 0 would"),
    ],
)
def test_misfits_name_the_key_to_change(nodes, demand, strategy, workers, key):
    problem = misfit(nodes, demand, strategy, workers[0])
    assert problem is not None and problem.startswith(key), problem


def test_elastic_training_needs_only_its_minimum():
    assert misfit(TWO_NODES, {"CPU": 1.0}, "PACK", 2) is None


@pytest.mark.timeout(180)
def test_cli_fails_fast_on_a_gpu_the_embedded_cluster_lacks(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "student.pt"
    earlier.write_bytes(b"an earlier run's student")
    proc = subprocess.run(
        [sys.executable, "-m", "still_cli", "train", "data.source=builtin:digits", "kd.weight=0",
         "scaling.num_workers=2", "scaling.use_gpu=true", "ray.num_cpus=2", "tracking.enabled=false",
         f"train.output_dir={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("still: error: scaling.use_gpu: 2 worker(s) × GPU=1 do not fit the Ray cluster "
                           "(1 node(s), CPU=2, GPU=0)"), last
    assert earlier.read_bytes() == b"an earlier run's student"
