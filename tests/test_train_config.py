"""TrainConfig: contract keys, value checks that name the key, shipped configs load."""

from __future__ import annotations

from pathlib import Path

import pytest

from still.config import load_config
from still.errors import StillError
from student_train.config import TrainConfig

CONTRACT_KEYS = [
    "store.uri=/tmp/s", "student.family=cnn", "student.width=2", "student.depth=3",
    "kd.temperature=4", "kd.weight=0.5", "train.epochs=2", "train.batch_size=64",
    "train.lr=0.01", "train.seed=7", "scaling.num_workers=2", "tracking.experiment=e",
]


def test_contract_keys_parse():
    cfg = load_config(TrainConfig, None, CONTRACT_KEYS)
    assert cfg.store.uri == ("/tmp/s",)
    assert cfg.scaling.ray_num_workers == 2
    assert cfg.student.family == "cnn" and cfg.kd.temperature == 4.0 and cfg.train.seed == 7


def test_store_list_and_elastic_workers():
    cfg = load_config(TrainConfig, None, ["store.uri=[a, b]", "scaling.num_workers=[1, 2]"])
    assert cfg.store.uri == ("a", "b")
    assert cfg.scaling.ray_num_workers == (1, 2) and cfg.scaling.max_workers == 2
    assert load_config(TrainConfig, None, ["scaling.num_workers=0"]).scaling.in_process


def test_gpu_shares():
    assert load_config(TrainConfig, None, []).scaling.gpus == 0
    assert load_config(TrainConfig, None, ["scaling.use_gpu=true"]).scaling.gpus == 1.0
    assert load_config(TrainConfig, None, ["scaling.gpus_per_worker=0.25"]).scaling.gpus == 0.25


def test_per_worker_resources_and_placement():
    cfg = load_config(TrainConfig, None, ["scaling.resources_per_worker={still_worker: 1}",
                                          "scaling.placement_strategy=STRICT_SPREAD"])
    assert dict(cfg.scaling.resources_per_worker) == {"still_worker": 1.0}
    assert cfg.scaling.placement_strategy == "STRICT_SPREAD"
    assert dict(load_config(TrainConfig, None, []).scaling.resources_per_worker) == {}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("kd.temperature=0", "kd.temperature must be > 0, got 0"),
        ("kd.temperature=-1", "kd.temperature must be > 0"),
        ("kd.weight=1.5", "kd.weight must be in [0, 1], got 1.5"),
        ("kd.weight=-0.1", "kd.weight must be in [0, 1]"),
        ("student.family=transformer", "student.family must be one of cnn, llama, mlp; got 'transformer'"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("scaling.num_workers=[2, 1]", "scaling.num_workers [min, max]"),
        ("kd.tempreature=3", "unknown config key 'kd.tempreature'"),
        ("scaling.resources_per_worker={CPU: 1}", "scaling.resources_per_worker.CPU: set scaling.cpus_per_worker"),
        ("scaling.resources_per_worker={still_worker: 0}", "scaling.resources_per_worker.still_worker must be > 0"),
        ("scaling.placement_strategy=spread", "scaling.placement_strategy must be one of 'PACK'"),
        ("scaling.gpus_per_worker=1.5", "scaling.gpus_per_worker must be in (0, 1] (0: one GPU when "
                                        "scaling.use_gpu), got 1.5: a worker trains on one device"),
        ("scaling.resources_per_worker={GPU: 0.5}", "scaling.resources_per_worker.GPU: set scaling.gpus_per_worker"),
        ("train.shuffle_buffer=-1", "train.shuffle_buffer must be >= 0, got -1"),
        ("kd.divergence=backward", "kd.divergence must be one of"),
        ("kd.jsd_beta=1", "kd.jsd_beta must be in (0, 1), got 1"),
        (("kd.divergence=reverse", "kd.tail=uniform"), "kd.divergence=reverse is computed over a top-k store's k classes "
                                                  "and one tail bin: it takes kd.tail=bucket"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(StillError, match=None) as info:
        load_config(TrainConfig, None, list(override) if isinstance(override, tuple) else [override])
    assert message in str(info.value)


def test_shipped_train_configs_load():
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/train*.yaml")):
        load_config(TrainConfig, path, [])
