"""Benchmark: what makes the same training run give different numbers on another machine.

    python bench/determinism.py                 # 2 epochs per arm, ~6 minutes on 2 CPUs
    python bench/determinism.py --epochs 1      # quicker

The main job's teacher (MLP 784-1200-1200-10, Adam 1e-3, batch 128, MNIST) trained in a
fresh process per arm, with the same seed, data and batch order; only the CPU kernels
torch may pick or the seed change:

- ``reference`` and ``repeat``: 1 thread, the machine's default kernels, twice;
- ``threads_2``: 2 intra-op threads (another ``scaling.cpus_per_worker``);
- ``aten_default``: ``ATEN_CPU_CAPABILITY=default`` (torch's kernels without AVX2, as
  on a CPU of another vector width: AVX-512 machines use other kernels again);
- ``mkl_compatible``: ``MKL_CBWR=COMPATIBLE`` (MKL's matmuls on their portable path);
- ``seed_1``, ``seed_2``: other seeds (the noise a different seed brings, for scale).

Per arm: test errors of 10,000 and a hash of every step's loss; ``bitwise_equal`` says
which arms match the reference exactly. The last stdout line is one JSON object, saved
to ``bench/results/determinism.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, save_result  # noqa: E402

ARMS = {
    "reference": {},
    "repeat": {},
    "threads_2": {"THREADS": "2"},
    "aten_default": {"ATEN_CPU_CAPABILITY": "default"},
    "mkl_compatible": {"MKL_CBWR": "COMPATIBLE"},
    "seed_1": {"SEED": "1"},
    "seed_2": {"SEED": "2"},
}


def train_once(epochs: int) -> dict:
    """One training run in this process, configured by THREADS and SEED; returns errors and loss hash."""
    import numpy as np
    import torch

    from still.config import DataConfig
    from still.datasets import load_arrays, resolve_dataset

    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    seed = int(os.environ.get("SEED", "0"))
    spec = resolve_dataset(DataConfig(source="builtin:mnist"))
    _, x, y = load_arrays(spec, ("train",))
    _, x_test, y_test = load_arrays(spec, ("test",))
    x, x_test = (torch.from_numpy(a.reshape(len(a), -1)) for a in (x, x_test))
    y, y_test = torch.from_numpy(y), torch.from_numpy(y_test)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(784, 1200), torch.nn.ReLU(), torch.nn.Linear(1200, 1200),
                                torch.nn.ReLU(), torch.nn.Linear(1200, 10))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    order_rng = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=order_rng)
        for start in range(0, len(x), 128):
            rows = order[start:start + 128]
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    with torch.no_grad():
        errors = int((model(x_test).argmax(1) != y_test).sum())
    return {"test_errors": errors, "final_loss": losses[-1], "capability": torch.backends.cpu.get_cpu_capability(),
            "loss_hash": hashlib.sha1(np.asarray(losses).tobytes()).hexdigest()[:16]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "determinism.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train_once(args.epochs)))
        return
    arms = {}
    for name, env in ARMS.items():
        log(f"{name}: {env or 'defaults'}")
        done = subprocess.run([sys.executable, __file__, "--child", "--epochs", str(args.epochs)],
                              env={**os.environ, "THREADS": "1", **env}, capture_output=True, text=True, check=True)
        arms[name] = {"env": env, **json.loads(done.stdout.strip().splitlines()[-1])}
    reference = arms["reference"]["loss_hash"]
    errors = [arm["test_errors"] for arm in arms.values()]
    result = {"epochs": args.epochs, "arms": arms,
              "bitwise_equal": {name: arm["loss_hash"] == reference for name, arm in arms.items()},
              "test_errors_range": [min(errors), max(errors)]}
    save_result(result, Path(args.out))


if __name__ == "__main__":
    main()
