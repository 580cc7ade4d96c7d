"""Bad inputs to still infer / still store through the real CLI: one-line errors, nothing lost.

Every case runs the ``still`` command (in this process: ``still_in_process``) and checks:
non-zero exit, one stderr line that names the bad input, and an existing good store in
the same root untouched.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from _teacher_fixtures import still_in_process, synthetic_parquet, train_digits_teacher
from teacher_infer import store as st
from _teacher_fixtures import write_small_store


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("still: error:")]
    assert result.returncode != 0, result.stdout + result.stderr
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    teacher = train_digits_teacher(base / "teacher.pt", steps=20)
    teacher5 = train_digits_teacher(base / "teacher5.pt", steps=20, num_classes=5)
    root = base / "stores"
    write_small_store(root / "goodstore")
    (base / "notes.txt").write_text("not a model")
    (base / "garbage").mkdir()
    (base / "garbage" / "x.parquet").write_bytes(b"this is not parquet")
    synthetic_parquet(base / "small", rows=50, features=64)
    _scatter_teacher(base / "scatter.pt")
    return base, teacher, teacher5, root


class _MergedSubclasses(torch.nn.Module):
    """A user's teacher: 20 sub-class logits summed into 10 classes into a float32 accumulator.

    scatter_add needs both sides in one dtype, so it runs in fp32 and fails under bf16 autocast.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 20)
        self.register_buffer("group", torch.arange(20) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 10, device=x.device)
        return out.scatter_add(1, self.group.expand(x.shape[0], 20), self.fc(x))


def _scatter_teacher(path: Path) -> None:
    torch.jit.script(_MergedSubclasses().eval()).save(str(path))


CASES = {
    "missing dataset": (["data.source={base}/nowhere", "teacher.uri={teacher}"], "nowhere"),
    "unreadable dataset": (["data.source={base}/garbage", "teacher.uri={teacher}"], "garbage"),
    "missing label column": (["data.source={base}/small", "data.label_column=target", "teacher.uri={teacher}"],
                             "target"),
    "teacher not a model": (["teacher.uri={base}/notes.txt"], "notes.txt"),
    "teacher output size": (["teacher.uri={teacher5}"], "outputs 5 classes"),
    "k > classes": (["teacher.uri={teacher}", "store.k=11"], "store.k=11"),
    "no samples": (["teacher.uri={teacher}", "store.mode=sampled", "store.samples=-1"], "store.samples must be >= 1"),
    "top-k of multi-label data": (["data.source=builtin:digits-overlay", "teacher.uri={teacher}", "store.mode=topk"],
                                  "use store.mode=dense"),
    "GPUs no node has": (["teacher.uri={teacher}", "infer.num_gpus=1"],
                         "infer.num_gpus=1, but no node of the cluster has that many GPUs"),
    "bf16 teacher that cannot": (["teacher.uri={base}/scatter.pt", "infer.precision=bf16"],
                                 "at infer.precision=bf16: RuntimeError: scatter(): Expected self.dtype to be equal to src.dtype"),
    "multi-label width": (["data.source=builtin:digits-overlay", "teacher.uri={teacher5}", "store.mode=dense"],
                          "outputs 5 classes but dataset 'digits-overlay' has multi-label rows 10 labels wide"),
}


@pytest.mark.timeout(200)
def test_bad_infer_inputs(ray_cluster, workspace):
    base, teacher, teacher5, root = workspace
    before = _tree_digest(root)
    for name, (overrides, expected) in CASES.items():
        args = [o.format(base=base, teacher=teacher, teacher5=teacher5) for o in overrides]
        if not any(a.startswith("data.source=") for a in args):
            args.append("data.source=builtin:digits")
        result = still_in_process(["infer", *args, f"store.root={root}", "tracking.enabled=false"], cwd=base)
        line = _error_line(result)
        assert expected in line, (name, line)
        assert _tree_digest(root) == before, f"{name}: the store root changed"
    assert st.verify_store(str(root / "goodstore"))["ok"]


@pytest.mark.timeout(120)
def test_bad_store_uris(workspace):
    base, _, _, root = workspace
    (base / "notastore").mkdir(exist_ok=True)
    incomplete = base / "incomplete"
    incomplete.mkdir(exist_ok=True)
    shutil.copy(root / "goodstore" / "part-00000.parquet", incomplete / "part-00000.parquet")
    for uri, expected in ((base / "notastore", "not a store"), (incomplete, "incomplete"),
                          (base / "absent", "does not exist")):
        for action in ("inspect", "verify"):
            result = still_in_process(["store", action, str(uri)], cwd=base)
            assert result.returncode != 0
            line = result.stderr.strip().splitlines()[-1] if action == "inspect" else result.stderr
            assert str(uri) in line and expected in line, (action, result.stderr)
    corrupt = base / "corrupt"
    shutil.copytree(root / "goodstore", corrupt, dirs_exist_ok=True)
    shard = corrupt / "part-00000.parquet"
    raw = bytearray(shard.read_bytes())
    raw[100:110] = b"\x00" * 10
    shard.write_bytes(bytes(raw))
    result = still_in_process(["store", "verify", str(corrupt), "--json"], cwd=base)
    assert result.returncode == 1
    assert str(corrupt) in result.stderr and "checksum" in result.stderr
    good = still_in_process(["store", "verify", str(root / "goodstore"), "--json"], cwd=base)
    assert good.returncode == 0 and '"ok": true' in good.stdout.splitlines()[-1]
    inspect = still_in_process(["store", "inspect", str(root / "goodstore")], cwd=base)
    assert inspect.returncode == 0 and "rows: 10" in inspect.stdout
