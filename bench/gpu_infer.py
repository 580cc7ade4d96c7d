"""GPU benchmark: ``still infer`` (streaming plan, teacher actor on the GPU) vs a plain CUDA loop.

    python bench/gpu_infer.py                 # 32,768 images, about 3 minutes on one H200
    python bench/gpu_infer.py --rows 4096     # smoke run

Same data: ``--rows`` random 3×224×224 uint8 images in Parquet (a ``fixed_shape_tensor``
column, as a user's preprocessed ImageNet shards would be). Same teacher: a ResNet-50
(25.6M parameters, written here in plain torch, TorchScript, random init). Same output:
top-k (k=10, fp16) labels-only shards.

- ``plain``: one process: pyarrow reads row-group batches, pinned uint8 host tensors are
  copied to the GPU, normalised there, the model runs under bf16 autocast, top-k on the
  CPU, Parquet written. No overlap of reading and compute.
- ``still``: ``run_infer`` with ``infer.num_gpus=1`` (streaming plan: CPU read tasks →
  one teacher actor per GPU → CPU compress/write tasks), ``infer.precision=bf16``.

Reported: images/s of each (wall time of the whole call, still's Ray start-up included),
their ratio, and the mean GPU utilisation over each run (``nvidia-smi`` sampled every
200 ms). Without CUDA it prints ``{"skipped": ...}`` and exits 0. The last stdout line
is one JSON object, also saved to ``bench/results/gpu_infer.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import save_result  # bench/common.py: these scripts run as python bench/<name>.py

HERE = Path(__file__).resolve().parent
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def log(message: str) -> None:
    print(f"[gpu-bench] {message}", file=sys.stderr, flush=True)


def resnet50(num_classes: int = 1000):
    """ResNet-50 (He et al. 2016, bottleneck blocks 3-4-6-3), plain torch."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int) -> None:
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.body(x) + self.skip(x))

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for index in range(blocks):
            layers.append(Bottleneck(cin, width, stride if index == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers).eval()


def make_data(directory: Path, rows: int, files: int = 8) -> Path:
    """Random 3×224×224 uint8 images as ``files`` Parquet files of (id, image tensor, label)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    kind = pa.fixed_shape_tensor(pa.uint8(), (3, 224, 224))
    per_file = -(-rows // files)
    for index, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        pixels = rng.integers(0, 256, (n, 3 * 224 * 224), dtype=np.uint8)
        storage = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 3 * 224 * 224)
        table = pa.table({"id": np.arange(start, start + n, dtype=np.int64),
                          "features": pa.ExtensionArray.from_storage(kind, storage),
                          "label": rng.integers(0, 1000, n).astype(np.int64)})
        pq.write_table(table, directory / f"part-{index:03d}.parquet", row_group_size=512, compression="none")
    return directory


class GpuUtilisation:
    """Mean GPU utilisation (%) from ``nvidia-smi`` sampled every 200 ms while in the block."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "GpuUtilisation":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            done = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                   "--id=0"], capture_output=True, text=True, check=False)
            if done.returncode == 0 and done.stdout.strip():
                self.samples.append(float(done.stdout.strip().splitlines()[0]))
            self._stop.wait(0.2)

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def plain_loop(data: Path, teacher: str, out: Path, batch_size: int) -> dict:
    import torch

    from teacher_infer.soft_labels import SoftLabelSpec, compress
    from teacher_infer.store import build_table

    start = time.perf_counter()
    model = torch.jit.load(teacher, map_location="cuda")
    mean = torch.tensor(MEAN, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(STD, device="cuda").view(1, 3, 1, 1)
    spec = SoftLabelSpec.create("topk", 1000, k=10, dtype="float16")
    out.mkdir(parents=True, exist_ok=True)
    rows = 0
    for index, path in enumerate(sorted(data.glob("*.parquet"))):
        for part, batch in enumerate(pq.ParquetFile(path).iter_batches(batch_size=batch_size)):
            storage = batch.column("features").storage.flatten().to_numpy()
            host = torch.from_numpy(storage.reshape(batch.num_rows, 3, 224, 224).copy()).pin_memory()
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                x = (host.to("cuda", non_blocking=True).float() / 255 - mean) / std
                logits = model(x).float().cpu().numpy()
            table = build_table(batch.column("id"), batch.column("label").to_numpy(),
                                np.zeros(batch.num_rows, np.int8), compress(logits, spec))
            pq.write_table(table, out / f"part-{index:03d}-{part:05d}.parquet")
            rows += batch.num_rows
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": round(seconds, 2), "images_per_s": round(rows / seconds, 1)}


def still_run(data: Path, teacher: str, root: Path, batch_size: int) -> dict:
    from still.config import load_config
    from teacher_infer.config import InferConfig
    from teacher_infer.infer import run_infer

    config = load_config(InferConfig, None, [
        f"data.source={data}", f"teacher.uri={teacher}", f"store.root={root}", "store.mode=topk", "store.k=10",
        "store.include_inputs=false", "infer.num_gpus=1", "infer.precision=bf16", "infer.plan=streaming",
        f"infer.batch_size={batch_size}", "tracking.enabled=false",
        # ImageNet normalisation, on the device
        f"data.image.mean={list(MEAN)}", f"data.image.std={list(STD)}"])
    start = time.perf_counter()
    summary = run_infer(config)
    seconds = time.perf_counter() - start
    return {"rows": summary["rows"], "seconds": round(seconds, 2), "images_per_s": round(summary["rows"] / seconds, 1),
            "bytes_per_row": summary["bytes_per_row"], "shards": summary["shards_written"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32_768)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--work", default="")
    parser.add_argument("--out", default=str(HERE / "results" / "gpu_infer.json"))
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"bench": "gpu_infer", "skipped": "no CUDA device"}))
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="still-gpu-bench-"))
    try:
        log(f"{args.rows} images of 3x224x224 uint8 into {work}")
        data = make_data(work / "data", args.rows)
        teacher = str(work / "resnet50.pt")
        torch.jit.script(resnet50()).save(teacher)
        log("plain CUDA loop")
        with GpuUtilisation() as util:
            plain = plain_loop(data, teacher, work / "plain", args.batch_size)
        plain["gpu_util_mean"] = util.mean
        log(f"plain: {plain}")
        log("still infer, streaming plan, 1 GPU actor")
        with GpuUtilisation() as util:
            still = still_run(data, teacher, work / "stores", args.batch_size)
        still["gpu_util_mean"] = util.mean
        log(f"still: {still}")
        result = {"bench": "gpu_infer", "device": torch.cuda.get_device_name(0), "rows": args.rows,
                  "teacher": "resnet50 (25.6M params, TorchScript, bf16 autocast)", "batch_size": args.batch_size,
                  "cpus": os.cpu_count(), "plain": plain, "still": still,
                  "ratio": round(still["images_per_s"] / plain["images_per_s"], 3)}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    save_result(result, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
