"""GPU benchmark: ``still infer`` (streaming plan, teacher actor on the GPU) vs a plain CUDA loop.

    python bench/gpu_infer.py                 # 32,768 images; not yet run on a GPU (a few minutes expected)
    python bench/gpu_infer.py --rows 4096     # smoke run
    python bench/gpu_infer.py --device cpu    # the same steps on the CPU: 128 images of 64×64, nothing saved

Same data: ``--rows`` random 3×S×S uint8 images (S = ``--image-size``, 224) in Parquet (a
``fixed_shape_tensor`` column, as a user's preprocessed ImageNet shards would be). Same
teacher: a ResNet-50 (25.6M parameters, written here in plain torch, TorchScript, random
init). Same output: top-k (k=10, fp16) labels-only shards.

- ``plain``: one process: pyarrow reads row-group batches, pinned uint8 host tensors are
  copied to the GPU, normalised there, the model runs under bf16 autocast, top-k on the
  CPU, Parquet written. No overlap of reading and compute.
- ``still``: ``still infer --json`` in a subprocess (the public path, under
  ``--step-timeout``) with ``infer.num_gpus=1`` (streaming plan: CPU read tasks → one
  teacher actor per GPU → CPU compress/write tasks), ``infer.precision=bf16``.

Reported: images/s of each (wall time of the whole call; for still, of the whole
process: imports and Ray start-up included), their ratio, and the mean GPU utilisation
over each run (``nvidia-smi`` sampled every 200 ms). A failed step is recorded
(``errors``) and the other still runs; the exit status is 1 if any failed. On the CPU
(``--device cpu``) the same steps run in fp32 with the teacher on CPU actors. Without
CUDA the default mode prints ``{"skipped": ...}`` and exits 0. The last stdout line is
one JSON object, also saved to ``bench/results/gpu_infer.json`` (``--out``; the CPU
mode saves nothing unless given one).
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

from common import attempt, run_still, save_result  # bench/common.py: these scripts run as python bench/<name>.py

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # still itself, where it is not installed (a bare GPU node)
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


def make_data(directory: Path, rows: int, size: int, files: int = 8) -> Path:
    """Random 3×``size``×``size`` uint8 images as ``files`` Parquet files of (id, image tensor, label)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    kind = pa.fixed_shape_tensor(pa.uint8(), (3, size, size))
    per_file = -(-rows // files)
    for index, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        pixels = rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8)
        storage = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 3 * size * size)
        labels = rng.integers(0, 1000, n).astype(np.int64)
        labels[0] = 999  # still counts a dataset's classes up to its largest label: 1000 at any --rows
        table = pa.table({"id": np.arange(start, start + n, dtype=np.int64),
                          "features": pa.ExtensionArray.from_storage(kind, storage), "label": labels})
        pq.write_table(table, directory / f"part-{index:03d}.parquet", row_group_size=512, compression="none")
    return directory


class GpuUtilisation:
    """Mean GPU utilisation (%) from ``nvidia-smi`` sampled every 200 ms while in the block (when ``enabled``)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "GpuUtilisation":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        if self.enabled:
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


def plain_loop(data: Path, teacher: str, out: Path, batch_size: int, size: int, device: str) -> dict:
    """One process, no overlap: read a batch, copy it to ``device``, normalise, forward, top-k, write."""
    import torch

    from teacher_infer.soft_labels import SoftLabelSpec, compress
    from teacher_infer.store import build_table

    cuda = device == "cuda"
    start = time.perf_counter()
    model = torch.jit.load(teacher, map_location=device)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    spec = SoftLabelSpec.create("topk", 1000, k=10, dtype="float16")
    out.mkdir(parents=True, exist_ok=True)
    rows = 0
    for index, path in enumerate(sorted(data.glob("*.parquet"))):
        for part, batch in enumerate(pq.ParquetFile(path).iter_batches(batch_size=batch_size)):
            storage = batch.column("features").storage.flatten().to_numpy()
            host = torch.from_numpy(storage.reshape(batch.num_rows, 3, size, size).copy())
            with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                x = (host.pin_memory().to(device, non_blocking=True) if cuda else host).float()
                logits = model((x / 255 - mean) / std).float().cpu().numpy()
            table = build_table(batch.column("id"), batch.column("label").to_numpy(),
                                np.zeros(batch.num_rows, np.int8), compress(logits, spec))
            pq.write_table(table, out / f"part-{index:03d}-{part:05d}.parquet")
            rows += batch.num_rows
    seconds = time.perf_counter() - start
    if cuda:
        del model
        torch.cuda.empty_cache()  # the still run that follows needs the GPU's memory
    return {"rows": rows, "seconds": round(seconds, 2), "images_per_s": round(rows / seconds, 1)}


def still_run(data: Path, teacher: str, root: Path, batch_size: int, cuda: bool, timeout: float) -> dict:
    """``still infer`` on ``data`` in a subprocess: the streaming plan, bf16 on one GPU (fp32 on CPUs)."""
    device = ["infer.num_gpus=1", "infer.precision=bf16"] if cuda else [
        "infer.num_gpus=0", "infer.precision=fp32", "infer.max_actors=1"]
    run = run_still(["infer", f"data.source={data}", f"teacher.uri={teacher}", f"store.root={root}",
                     "store.mode=topk", "store.k=10", "store.include_inputs=false", "infer.plan=streaming",
                     f"infer.batch_size={batch_size}", "tracking.enabled=false", *device,
                     # ImageNet normalisation, on the device
                     f"data.image.mean={list(MEAN)}", f"data.image.std={list(STD)}"], timeout=timeout)
    summary = run["summary"]
    return {"rows": summary["rows"], "seconds": round(run["seconds"], 2),
            "images_per_s": round(summary["rows"] / run["seconds"], 1), "bytes_per_row": summary["bytes_per_row"],
            "driver_mib": run["driver_mib"], "worker_mib": run["worker_mib"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: the same steps on the CPU (small defaults, nothing saved)")
    parser.add_argument("--rows", type=int, default=0, help="default 32,768 (cuda), 128 (cpu)")
    parser.add_argument("--image-size", type=int, default=0, help="default 224 (cuda), 64 (cpu)")
    parser.add_argument("--batch-size", type=int, default=0, help="default 256 (cuda), 32 (cpu)")
    parser.add_argument("--step-timeout", type=float, default=300.0, help="seconds for the still infer process")
    parser.add_argument("--work", default="")
    parser.add_argument("--out", default="", help="result JSON (default bench/results/gpu_infer.json; cpu: none)")
    args = parser.parse_args(argv)
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print(json.dumps({"bench": "gpu_infer", "skipped": "no CUDA device"}))
        return 0
    rows = args.rows or (32_768 if cuda else 128)
    size = args.image_size or (224 if cuda else 64)
    batch = args.batch_size or (256 if cuda else 32)
    out = Path(args.out) if args.out else (HERE / "results" / "gpu_infer.json" if cuda else None)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="still-gpu-bench-"))
    errors: dict[str, str] = {}
    result = {"bench": "gpu_infer", "mode": args.device, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "rows": rows, "image_size": size, "batch_size": batch, "cpus": os.cpu_count(),
              "teacher": f"resnet50 (25.6M params, TorchScript, {'bf16 autocast' if cuda else 'fp32'})"}
    try:
        log(f"{rows} images of 3x{size}x{size} uint8 into {work}")
        data = make_data(work / "data", rows, size)
        teacher = str(work / "resnet50.pt")
        torch.jit.script(resnet50()).save(teacher)
        log(f"plain {'CUDA' if cuda else 'CPU'} loop")
        with GpuUtilisation(cuda) as util:
            plain = attempt("plain", errors, lambda: plain_loop(data, teacher, work / "plain", batch, size,
                                                                args.device))
        if plain:
            plain["gpu_util_mean"] = util.mean
        log(f"plain: {plain}")
        log(f"still infer, streaming plan, 1 {'GPU' if cuda else 'CPU'} actor")
        with GpuUtilisation(cuda) as util:
            still = attempt("still", errors, lambda: still_run(data, teacher, work / "stores", batch, cuda,
                                                               args.step_timeout))
        if still:
            still["gpu_util_mean"] = util.mean
        log(f"still: {still}")
        result.update(plain=plain, still=still, ratio=round(still["images_per_s"] / plain["images_per_s"], 3)
                      if plain and still else None)
    except Exception as exc:  # noqa: BLE001 - data or teacher: nothing could run; recorded
        errors["setup"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        log(f"FAILED: {errors['setup']}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result.update(ok=not errors, errors=errors)
    save_result(result, out)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
