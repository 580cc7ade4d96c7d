"""Image datasets on real PNGs of MNIST: Parquet bytes columns and image folders.

PNG is lossless, so a teacher run over the PNGs must give exactly the logits it gives
over the same digits as numbers; cropping a padded folder must too. Bad images
(undecodable bytes, sizes that differ without resize/crop) fail with the row named.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from _teacher_fixtures import mnist_digits, still_in_process, summary_json, train_pixel_teacher
from still.config import DataConfig, ImageConfig, load_config
from still.datasets import load_arrays, resolve_dataset
from still.errors import StillError
from teacher_infer import store as st
from teacher_infer.config import InferConfig
from teacher_infer.infer import run_infer

ROWS = 600


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mnist_pngs(tmp_path_factory):
    """600 MNIST digits three ways: uint8 numbers, a Parquet column of PNG bytes, a folder of padded PNGs."""
    base = tmp_path_factory.mktemp("images")
    ids, pixels, labels = mnist_digits(ROWS)
    numbers = base / "numbers.parquet"
    pq.write_table(pa.table({"id": ids, "features": pa.FixedSizeListArray.from_arrays(
        pa.array(pixels.reshape(-1)), 784), "label": labels}), numbers)
    pngs = base / "pngs.parquet"
    pq.write_table(pa.table({"id": ids, "image": pa.array([_png(p) for p in pixels], pa.binary()),
                             "label": labels}), pngs, row_group_size=128)
    folder = base / "folder"
    order = []
    for i, (p, label) in enumerate(zip(pixels, labels)):
        (folder / f"digit-{label}").mkdir(parents=True, exist_ok=True)
        (folder / f"digit-{label}" / f"{i:05d}.png").write_bytes(_png(np.pad(p, 2)))  # 32x32
        order.append((f"digit-{label}/{i:05d}.png", i))
    folder_rows = [i for _, i in sorted(order)]  # the folder's ids count files in sorted path order
    teacher = train_pixel_teacher(base / "teacher.pt", pixels, labels)
    return base, numbers, pngs, folder, folder_rows, teacher


def _infer(source, teacher, root, *overrides):
    cfg = load_config(InferConfig, None, [f"data.source={source}", f"teacher.uri={teacher}", f"store.root={root}",
                                          "store.mode=dense", "store.dtype=float32", "tracking.enabled=false",
                                          *overrides])
    return run_infer(cfg)


def _logits(uri):
    table = st.open_store(uri).read_table(["id", "logits"]).sort_by("id")
    return table["id"].to_numpy(), np.stack(table["logits"].to_numpy(zero_copy_only=False))


@pytest.mark.timeout(600)
def test_png_column_and_folder_give_the_numbers_logits(ray_cluster, mnist_pngs):
    base, numbers, pngs, folder, folder_rows, teacher = mnist_pngs
    root = base / "stores"
    reference_ids, reference = _logits(_infer(numbers, teacher, root)["store"])
    assert reference_ids.tolist() == list(range(ROWS))

    from_png = _infer(pngs, teacher, root, "data.feature_column=image")
    manifest = st.open_store(from_png["store"]).manifest
    assert manifest["preprocessing"]["image"] == {"mode": "L", "resize": 0, "crop": 0}
    assert manifest["preprocessing"]["input_shape"] == [1, 28, 28]
    assert manifest["storage"]["include_inputs"] is True  # 470 kB of pixels: auto keeps them
    np.testing.assert_array_equal(_logits(from_png["store"])[1], reference)

    from_folder = _infer(folder, teacher, root, "data.image.crop=28")
    spec = resolve_dataset(DataConfig(source=str(folder), image=ImageConfig(crop=28)))
    assert spec.class_names == tuple(f"digit-{i}" for i in range(10)) and spec.input_shape == (1, 28, 28)
    folder_ids, folder_logits = _logits(from_folder["store"])
    np.testing.assert_array_equal(folder_logits, reference[folder_rows])
    assert from_folder["key"] != from_png["key"]
    assert _infer(folder, teacher, root, "data.image.crop=28")["cache_hit"] is True
    uncropped = resolve_dataset(DataConfig(source=str(folder)))
    assert uncropped.input_shape == (1, 32, 32) and uncropped.fingerprint == spec.fingerprint

    # through the still command: a labels-only fp16 top-3 store of the PNGs, and a student at T = 4 that
    # decodes them again from the source
    infer = still_in_process(["infer", f"data.source={pngs}", "data.feature_column=image",
                              f"teacher.uri={teacher}", f"store.root={root}", "store.include_inputs=false",
                              "store.mode=topk", "store.k=3", "--json"], cwd=base)
    assert infer.returncode == 0, infer.stderr[-2000:]
    labels_only = summary_json(infer)
    assert labels_only["bytes_per_row"] < 0.5 * from_png["bytes_per_row"]
    assert "input" not in st.open_store(labels_only["store"]).manifest["columns"]
    train = still_in_process(["train", f"store.uri={labels_only['store']}", "student.width=64",
                              "train.epochs=15", "kd.temperature=4", "scaling.num_workers=0",
                              f"train.output_dir={base / 'student'}", "--json"], cwd=base)
    assert train.returncode == 0, train.stderr[-2000:]
    student = summary_json(train)
    assert student["student_test_accuracy"] > 0.6, student["student_test_accuracy"]


@pytest.mark.timeout(300)
def test_rgb_resize_and_mean_std(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "rgb"
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(folder / name / f"{i}.jpg")
    cfg = DataConfig(source=str(folder), image=ImageConfig(resize=24, crop=20, mean=(0.5, 0.5, 0.5),
                                                           std=(0.25, 0.25, 0.25)))
    spec = resolve_dataset(cfg)
    assert spec.input_shape == (3, 20, 20) and spec.image["mode"] == "RGB" and spec.num_rows == 6
    ids, x, y = load_arrays(spec, splits=("train", "val", "test"))
    with Image.open(folder / "cat" / "0.jpg") as img:  # 60x40 → 36x24 → centre 20x20, by hand
        expected = np.asarray(img.convert("RGB").resize((36, 24), Image.Resampling.BILINEAR).crop((8, 2, 28, 22)))
    row = int(np.flatnonzero(ids == 0)[0])
    np.testing.assert_allclose(x[row], (expected.transpose(2, 0, 1) / 255 - 0.5) / 0.25, atol=1e-5)
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(StillError, match="data.image.mean has 1 values but the images .* have 3 channel"):
        resolve_dataset(DataConfig(source=str(folder), image=ImageConfig(mean=(0.5,), std=(0.2,))))


@pytest.mark.timeout(300)
def test_bad_images(ray_cluster, mnist_pngs, tmp_path):
    base, _, pngs, _, _, teacher = mnist_pngs
    table = pq.read_table(pngs)
    blobs = table["image"].to_pylist()
    root = tmp_path / "stores"

    broken = list(blobs)
    broken[137] = blobs[137][:40]  # a truncated PNG
    pq.write_table(table.set_column(1, "image", pa.array(broken, pa.binary())), tmp_path / "broken.parquet")
    with pytest.raises(StillError, match=r"image id 137 cannot be decoded"):
        _infer(tmp_path / "broken.parquet", teacher, root, "data.feature_column=image")

    mixed = list(blobs)
    mixed[200] = _png(np.zeros((30, 28), dtype=np.uint8))
    pq.write_table(table.set_column(1, "image", pa.array(mixed, pa.binary())), tmp_path / "mixed.parquet")
    with pytest.raises(StillError, match=r"image id 200 is 28x30 \(1 channel\) after preprocessing, others are "
                                         r"28x28 .*set data.image.resize and data.image.crop"):
        _infer(tmp_path / "mixed.parquet", teacher, root, "data.feature_column=image")
    assert not list(root.glob("*/manifest.json"))  # neither became a store
    assert _infer(tmp_path / "mixed.parquet", teacher, root, "data.feature_column=image", "data.image.resize=28",
                  "data.image.crop=28")["rows"] == ROWS
