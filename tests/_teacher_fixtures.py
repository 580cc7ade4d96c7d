"""Helpers shared by the teacher_infer tests: a quickly trained digits teacher, synthetic data."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from still.checkpoints import save_checkpoint
from still.models import build_model


def train_digits_teacher(path: Path, steps: int = 300, num_classes: int = 10) -> Path:
    """Trains a small MLP on builtin:digits with plain torch (about a second) and saves it."""
    from still.config import DataConfig
    from still.datasets import load_arrays, resolve_dataset

    spec = resolve_dataset(DataConfig(source="builtin:digits"))
    _, x, y = load_arrays(spec, splits=("train", "val", "test"))
    torch.manual_seed(0)
    args = {"input_shape": list(spec.input_shape), "num_classes": num_classes, "width": 64, "depth": 1}
    model = build_model("mlp", **args)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y) % num_classes
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (128,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(str(path), model.eval(), "mlp", args, {"input_scale": spec.input_scale})
    return path


def mnist_digits(rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``rows`` MNIST digits: ids, uint8 pixels ``(rows, 28, 28)`` and labels."""
    from still.config import DataConfig
    from still.datasets import resolve_dataset

    spec = resolve_dataset(DataConfig(source="builtin:mnist"))
    fs, paths = spec.arrow_files()
    table = pq.read_table(paths[0], filesystem=fs, columns=["id", "features", "label"]).slice(0, rows)
    pixels = np.stack(table["features"].to_numpy(zero_copy_only=False)).reshape(rows, 28, 28).astype(np.uint8)
    return table["id"].to_numpy(), pixels, table["label"].to_numpy()


def train_pixel_teacher(path: Path, pixels: np.ndarray, labels: np.ndarray) -> Path:
    """Trains a confident MLP 784-128-10 on these digits (150 full-batch steps) and saves it."""
    torch.manual_seed(0)
    args = {"input_shape": [1, 28, 28], "num_classes": 10, "width": 128, "depth": 1}
    model = build_model("mlp", **args)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(pixels.reshape(len(pixels), 1, 28, 28).astype(np.float32) / 255)
    y = torch.from_numpy(labels.copy())
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(str(path), model.eval(), "mlp", args, {"input_scale": 1 / 255})
    return path


def synthetic_parquet(directory: Path, rows: int, features: int = 784, classes: int = 10,
                      row_group_size: int = 5000, seed: int = 0) -> Path:
    """Writes a uint8 feature dataset (id, features fixed_size_list<uint8>, label)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (rows, features), dtype=np.uint8)
    table = pa.table({
        "id": np.arange(rows, dtype=np.int64),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), features),
        "label": rng.integers(0, classes, rows).astype(np.int64),
    })
    pq.write_table(table, directory / "part-0.parquet", row_group_size=row_group_size)
    return directory


def still_cli(args: list[str], cwd: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``still ARGS`` in a subprocess (tracking into cwd's sqlite)."""
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "still_cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def summary_json(result: subprocess.CompletedProcess) -> dict:
    """The ``--json`` summary of a ``still`` run that succeeded: its last JSON line on stdout
    (in process, Ray's worker lines share that stdout and may come after it)."""
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


def still_in_process(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``still ARGS`` in this process, as :func:`still_cli` does in a subprocess: the same
    parsing, config resolution, output and exit status, with tracking into cwd's sqlite.

    For tests whose subject is what a verb does, not the process that runs it: the
    imports (torch, transformers, MLflow: 10-15 s a command on 2 cores) are paid once
    per session, and a verb that uses Ray joins the session's cluster (take the
    ``ray_cluster`` fixture first, or the verb starts an embedded one that then outlives
    the test). ``env`` is set for the call only.
    """
    from still_cli.main import main

    overrides = {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", **(env or {})}
    saved = {key: os.environ.get(key) for key in overrides}
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.environ.update(overrides)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(here)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess(["still", *args], code, out.getvalue(), err.getvalue())


def kill_infer_mid_run(command: list[str], cwd: Path, env: dict, store_root: Path | None = None,
                       min_shards: int = 4, timeout: float = 300, list_shards=None) -> list:
    """Starts a ``still infer`` driver and ``kill -9``s it once ``min_shards`` shards exist.

    The driver runs in its own session, which is killed whole afterwards (with an
    embedded Ray it holds that cluster). Shards are looked for under ``store_root`` or,
    for stores elsewhere (S3), with ``list_shards()``. Returns the shards seen at the kill.
    """
    import signal
    import time

    if list_shards is None:
        def list_shards():
            return list(store_root.glob("*/part-*.parquet"))

    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout  # generous: Ray start-up crawls on a loaded 2-core box
    parts: list = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            parts = list_shards()
            if len(parts) >= min_shards:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "still infer finished (or failed) before it could be killed"
        assert len(parts) >= min_shards, "no shards appeared in time"
        proc.send_signal(signal.SIGKILL)  # kill -9 of the driver, mid-run
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(1.0)  # Ray stops the dead driver's tasks
    return parts


def wide_mlp_teacher(path: Path) -> Path:
    """A randomly initialised 784-1500-1500-1500-10 MLP saved as a still checkpoint: slow
    enough per shard that a kill lands mid-run."""
    torch.manual_seed(0)
    args = {"input_shape": [784], "num_classes": 10, "width": 1500, "depth": 3}
    return Path(save_checkpoint(str(path), build_model("mlp", **args), "mlp", args))


def assert_killed_store(store_root: Path, shard_rows: int, planned: int) -> tuple[Path, list[Path]]:
    """Checks what a killed ``still infer`` left: no manifest (so the store refuses to
    open), only complete shards under ``part-*`` names, at least 4 and fewer than planned.

    Returns:
        The store folder and its shards.
    """
    import pytest

    from teacher_infer import store as st

    (store_dir,) = list(store_root.iterdir())
    killed_parts = sorted(store_dir.glob("part-*.parquet"))
    assert not (store_dir / st.MANIFEST_NAME).exists()
    with pytest.raises(Exception, match="incomplete"):
        st.open_store(str(store_dir))
    for part in killed_parts:  # only complete shards are ever visible under part-* names
        assert pq.read_metadata(part).num_rows == shard_rows
    assert 4 <= len(killed_parts) < planned
    return store_dir, killed_parts


def write_small_store(directory: str | Path, mode: str = "topk", rows: int = 10, classes: int = 5,
                      k: int = 3, dtype: str = "float16", seed: int = 1) -> tuple[str, np.ndarray]:
    """Writes a complete one-shard store with still's own writer functions (no Ray, no teacher).

    Returns:
        The store's URI and the full logits its teacher outputs came from.
    """
    from still.storage import resolve
    from teacher_infer import fidelity as fid
    from teacher_infer import metrics as tm
    from teacher_infer import store as st
    from teacher_infer.soft_labels import SoftLabelSpec, compress

    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(rows, classes)) * 3).astype(np.float32)
    labels = rng.integers(0, classes, rows)
    splits = (np.arange(rows) % 3).astype(np.int8)
    spec = SoftLabelSpec.create(mode, classes, dtype=dtype, k=k, samples=16)
    outputs = compress(logits, spec, rng)
    stats = tm.empty_stats()
    tm.accumulate_stats(stats, tm.row_stats(logits, labels), splits)
    fidelity = fid.empty_stats()
    fid.accumulate_stats(fidelity, fid.measure_rows(logits, outputs, spec))
    table = st.build_table(np.arange(rows), labels, splits, outputs,
                           inputs=rng.integers(0, 255, (rows, 4)).astype(np.uint8))
    data = st.shard_bytes(table, {"metrics": stats, "fidelity": fidelity})
    loc = resolve(str(directory))
    loc.join(st.shard_name(0)).write_atomic(data)
    storage = {**spec.manifest_fields(), "include_inputs": True, "feature_layers": []}
    if mode == "sampled":
        storage["max_support"] = int(np.diff(outputs["sample_idx"].offsets).max())
    st.write_manifest(loc, {
        "format": st.FORMAT_NAME, "format_version": st.FORMAT_VERSION, "key": "k" * 16, "rows": rows,
        "num_classes": classes, "task": "multiclass", "storage": storage,
        "preprocessing": {"input_shape": [4], "input_scale": 1 / 255},
        "teacher": {"fingerprint": "f" * 64}, "dataset": {"name": "x", "fingerprint": "d"},
        "shards": [st.shard_record(st.shard_name(0), data, rows)], "teacher_metrics": tm.finish_metrics(stats),
        "fidelity": fid.summarize(fidelity), "fidelity_rows": fidelity["n"],
    })
    return loc.uri, logits
