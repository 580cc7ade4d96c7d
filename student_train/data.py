"""What training reads: a store (or several) or a plain dataset, resolved once on the driver.

:class:`Source` holds the opened stores themselves (``teacher_infer.store.Store``: its
location resolved once, its manifest) or the dataset, the teacher layers training
reads, and the source's *units*: the pieces it is read in (``student_train.reader``).
Everything else (classes, shapes, storage modes, views) is a property of those. It is
pickled once into the workers' ``LoopSpec``; the reader reads from it directly.

One conversion, :func:`convert_rows`, turns rows as read (store columns, or a
dataset's id/features/label/split columns) into the arrays the loop consumes:

    x      (n, prod(input_shape))      the raw input as stored (uint8 pixels stay uint8);
                                       the training device normalises it
                                       (``Source.normalisation``: scale, mean/std, shape)
    y      int64 (n,) class ids, -1 when unlabelled; multi-label: int8 (n, C) 0/1, -1 rows unlabelled
    t<i>_* the training columns of store i, fixed-width and still sparse
           (``teacher_infer.store.teacher_arrays``: k ids and log-probabilities per row
           for top-k, the padded draws for sampled, C logits only for dense stores);
           bound to the run's temperature where rows are made (:func:`bind_temperature`)
    hint_<layer> (n, prod(shape))      train split: a stored teacher layer (``Source.features``),
                                       flattened, in the store's dtype (hint distillation)
    aug    int16 (n, P)                multi-view stores, train split: each row's view
                                       (``still.augment``), replayed on the device
    view, sample                       multi-view stores, train split: the row's view and a
                                       key of its sample (:func:`one_view_mask` draws with them)

Nothing grows before it reaches the worker: no float copy of the inputs, no dense
``(n, C)`` teacher array. The loop moves a batch to its device and builds the input
and the teacher's target there (``teacher_infer.targets.target_from_columns``).

Ensembles: stores of one dataset share ids; each member's teacher columns are joined
to the primary store's rows by id, keep their own prefix, and the loss averages the
members' probabilities at T on the device (``student_train.losses``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from still.augment import AugmentConfig, param_names
from still.errors import StillError
from teacher_infer.soft_labels import SoftLabelSpec

SPLITS = {"train": 0, "val": 1, "test": 2}


class TokenIds:
    """The model input of token blocks: the stored ids (uint16/uint32) as int64 on the device."""

    scale = 1.0

    @staticmethod
    def apply(x: Any) -> Any:
        """``x`` as int64 (what embeddings and cross-entropy take)."""
        return x.long()

    @staticmethod
    def apply_numpy(x: np.ndarray) -> np.ndarray:
        """:meth:`apply` for numpy rows."""
        return x.astype(np.int64)


TOKEN_IDS = TokenIds()


@dataclasses.dataclass(frozen=True)
class Source:
    """Everything the workers need to read and convert the data; built on the driver.

    Attributes:
        stores: The opened stores (``teacher_infer.store.Store``), the primary first;
            empty for plain training on a dataset.
        dataset: The dataset a plain run reads, or the source a labels-only store's
            rows are joined back to for their inputs; None for a self-contained store.
        features: The primary store's stored teacher layers that training reads
            (``teacher_infer.store.StoredFeature``; only those ``kd.hints`` uses,
            ``student_train.hints.keep_hinted_layers``).
        units: The pieces the primary input is read in, with their rows per split
            (``student_train.reader.Unit``, from ``student_train.reader.scan_units``).
        blocks: A language model's token blocks (``still.text.packing.TokenBlocks``), or None.
            With a store (``teacher_infer.lm_store.LMStore``) too, the store's rows are
            blocks, and their tokens are joined back from these by block id.
    """

    stores: tuple[Any, ...] = ()
    dataset: Any = None
    features: tuple[Any, ...] = ()
    units: tuple[Any, ...] = ()
    blocks: Any = None

    @property
    def kind(self) -> str:
        """``store``, ``dataset``, ``blocks`` (token blocks of a text source), or ``lm_store``
        (a language-model store over token blocks)."""
        if self.stores:
            return "lm_store" if self.blocks is not None else "store"
        return "blocks" if self.blocks is not None else "dataset"

    @property
    def primary(self) -> Any:
        """The primary store (the one whose rows are trained on); None for a dataset."""
        return self.stores[0] if self.stores else None

    @property
    def name(self) -> str:
        """Store URI(s), the dataset's name or the token blocks' directory, for messages."""
        if self.stores:
            return ",".join(s.uri for s in self.stores)
        return str(self.blocks.path) if self.blocks is not None else self.dataset.name

    @property
    def has_teacher(self) -> bool:
        """True when the data carries teacher outputs."""
        return bool(self.stores)

    @property
    def num_classes(self) -> int:
        """C (a language model's vocabulary: its store's, which may exceed the tokenizer's)."""
        if self.blocks is not None:
            return self.primary.soft_labels.num_classes if self.stores else self.blocks.vocab_size
        return self.primary.num_classes if self.stores else self.dataset.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names, index = class id (none for token blocks)."""
        if self.blocks is not None:
            return ()
        return tuple(self.primary.class_names if self.stores else self.dataset.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input (``(seq_len,)`` for token blocks)."""
        if self.blocks is not None:
            return (self.blocks.seq_len,)
        return tuple(self.primary.input_shape if self.stores else self.dataset.input_shape)

    @property
    def task(self) -> str:
        """``multiclass``, ``multilabel``, or ``causal_lm`` (next-token prediction on token blocks)."""
        if self.blocks is not None:
            return "causal_lm"
        return self.primary.task if self.stores else self.dataset.task

    @property
    def normalisation(self) -> Any:
        """How raw inputs become model inputs (``still.datasets.Normalisation``; token ids become int64)."""
        if self.blocks is not None:
            return TOKEN_IDS
        from still.datasets import Normalisation

        return Normalisation.of(self.primary.manifest["preprocessing"] if self.stores else self.dataset)

    @property
    def manifests(self) -> tuple[Mapping[str, Any], ...]:
        """The stores' manifests."""
        return tuple(s.manifest for s in self.stores)

    @property
    def teachers(self) -> tuple[SoftLabelSpec, ...]:
        """Per store, how its teacher outputs are stored."""
        return tuple(s.soft_labels for s in self.stores)

    @property
    def max_support(self) -> tuple[int, ...]:
        """Per store, the width its teacher columns are padded to."""
        return tuple(s.max_support for s in self.stores)

    @property
    def views(self) -> int:
        """K, rows per sample of a multi-view store (1 otherwise)."""
        return self.primary.views if self.kind == "store" else 1

    @property
    def augment(self) -> AugmentConfig:
        """The augmentation a multi-view store's views were made with."""
        return self.primary.augment if self.kind == "store" else AugmentConfig()

    @property
    def num_rows(self) -> int:
        """Rows in the primary input (blocks of a text source)."""
        if self.stores:
            return self.primary.num_rows
        return sum(self.blocks.rows.values()) if self.blocks is not None else self.dataset.num_rows

    @property
    def split_rows(self) -> dict[str, int]:
        """Rows per split name (of every view), from the units."""
        return {name: sum(u.counts[code] for u in self.units) * (self.views if self.views > 1 else 1)
                for name, code in SPLITS.items()}

    def row_bytes(self) -> int:
        """Bytes of one converted row (x, y, teacher columns, hint layers) in memory; an upper bound
        (inputs counted as 4 bytes a value, though uint8 inputs stay 1; token ids as stored)."""
        if self.kind in ("blocks", "lm_store"):
            tokens = self.blocks.seq_len * np.dtype(self.blocks.token_dtype).itemsize
            if self.kind == "blocks":
                return tokens
            spec, positions = self.primary.soft_labels, self.primary.positions
            per_position = {"topk": 8 * spec.k + 4, "sampled": 8 * spec.samples + 8}[spec.mode]
            return tokens + positions * (per_position + 8)  # + the teacher's top-1 per position
        n = 4 * math.prod(self.input_shape) + 9 + (self.num_classes if self.task == "multilabel" else 0)
        if self.views > 1:
            n += 10 + 2 * len(param_names(self.augment))
        for spec, width in zip(self.teachers, self.max_support):
            value = 2 if spec.dtype == "float16" else 4
            grid = 4 * (1 + len(spec.temperatures))
            n += {"dense": value * spec.num_classes, "topk": width * (4 + value) + grid,
                  "sampled": width * (4 + 2 + value) + grid}[spec.mode]
        return n + 4 * sum(math.prod(f.shape) for f in self.features)

    def store_columns(self, split_codes: Sequence[int]) -> list[str]:
        """The primary store's columns training reads for rows of these split codes."""
        train = SPLITS["train"] in split_codes
        views = ["view", "augment"] if self.views > 1 and train else []
        hints = [f.column for f in self.features] if train else []
        return ["id", "label", "split", *views, "input", *self.primary.soft_labels.columns, *hints]


def resolve_source(store_uris: Sequence[str], data_cfg: Any, *, verify: bool = False) -> Source:
    """Opens and checks the stores (or the dataset) before any training starts.

    Every open checks the manifests, each shard's size and footer schema
    (:func:`teacher_infer.store.check_shards`: milliseconds, no data page read), then
    reads the small ``split`` (and ``view``) columns to count each unit's rows.

    Args:
        store_uris: Zero, one or several store URIs.
        data_cfg: The ``data`` section (used when there is no store).
        verify: Also re-read every shard against its manifest (``verify_store``:
            checksums, values, unique ids), as ``train.verify_store=true`` asks.

    Raises:
        StillError: A store is incomplete, of another format version, has a missing,
            resized or unreadable shard, fails verification, is labels-only and its
            source is missing or changed, or the stores of an ensemble disagree on
            classes, task or rows.
    """
    from student_train.reader import scan_units

    if not store_uris:
        from still.datasets import resolve_dataset

        source = Source(dataset=resolve_dataset(data_cfg))
        return dataclasses.replace(source, units=scan_units(source))
    from teacher_infer.store import check_shards, open_store, source_dataset, verify_store

    stores = []
    for uri in store_uris:
        store = open_store(uri)
        check_shards(store)
        if verify:
            report = verify_store(uri)
            if not report["ok"]:
                raise StillError(f"store {uri!r} fails verification: {'; '.join(report['problems'][:3])}")
        stores.append(store)
    first = stores[0]
    for other in stores[1:]:
        if other.num_classes != first.num_classes:
            raise StillError(f"ensemble stores disagree on classes: {first.uri!r} has {first.num_classes}, "
                             f"{other.uri!r} has {other.num_classes}")
        if other.task != first.task:
            raise StillError(f"ensemble stores disagree on task: {first.uri!r} vs {other.uri!r}")
        if first.views > 1 or other.views > 1:
            raise StillError(f"ensembles of multi-view stores are not supported ({first.uri!r}: {first.views} "
                             f"views, {other.uri!r}: {other.views}): their rows join by id, one row per sample")
        if other.num_rows != first.num_rows:
            raise StillError(f"ensemble stores must cover the same rows: {first.uri!r} has {first.num_rows}, "
                             f"{other.uri!r} has {other.num_rows}")
    source = Source(stores=tuple(stores), dataset=None if first.include_inputs else source_dataset(first),
                    features=first.features)
    return dataclasses.replace(source, units=scan_units(source))


def resolve_block_source(data_cfg: Any, tokenizer_uri: str) -> Source:
    """The token blocks of a text source (tokenized and packed once, cached: ``still.text.packing``).

    Args:
        data_cfg: The ``data`` section: the text source, ``data.seq_len``.
        tokenizer_uri: The tokenizer the blocks are made with (``data.tokenizer``).

    Raises:
        StillError: A text source, tokenizer or ``data.seq_len`` that cannot make blocks.
    """
    from still.text.packing import token_blocks
    from student_train.reader import scan_units

    source = Source(blocks=token_blocks(data_cfg, tokenizer_uri))
    return dataclasses.replace(source, units=scan_units(source))


def resolve_lm_store_source(store_uri: str, data_cfg: Any) -> Source:
    """A language-model store and the token blocks its rows are joined to, checked against each other.

    The blocks are those of ``data.source`` (the store's own source when left at its default) cut with
    the store's tokenizer at ``data.seq_len``; they must be the very blocks the teacher
    read: same tokenizer, same corpus, same ``seq_len``.

    Raises:
        StillError: Not a language-model store (a classifier store is named as such),
            ``data.tokenizer`` or ``data.seq_len`` not the store's, or blocks of another
            corpus (each named, before any training).
    """
    from still.text.packing import token_blocks
    from still.text.tokenizer import load_tokenizer
    from student_train.reader import scan_units
    from teacher_infer.lm_store import open_lm_store

    store = open_lm_store(store_uri)
    m = store.manifest
    tokenizer = m["tokenizer"]
    if data_cfg.tokenizer and load_tokenizer(data_cfg.tokenizer).fingerprint != tokenizer["fingerprint"]:
        raise StillError(f"data.tokenizer={data_cfg.tokenizer!r} is not the tokenizer of store {store_uri!r} "
                         f"({tokenizer['uri']!r}): a student learns the teacher's token ids (leave data.tokenizer "
                         "unset to use the store's)")
    if data_cfg.seq_len != store.seq_len:
        raise StillError(f"data.seq_len={data_cfg.seq_len} does not match store {store_uri!r}, whose blocks are "
                         f"{store.seq_len} tokens: set data.seq_len={store.seq_len}")
    # data.source left at its (classifier) default means the store's own text source
    text = m["blocks"]["source"] if data_cfg.source == type(data_cfg)().source else data_cfg.source
    blocks_cfg = dataclasses.replace(data_cfg, source=text, tokenizer=tokenizer["uri"])
    blocks = token_blocks(blocks_cfg, tokenizer["uri"])
    if blocks.key != m["blocks"]["key"]:
        corpus = blocks.manifest.get("corpus", {}).get("fingerprint")
        what = (f"the tokenizer changed (fingerprint {blocks.tokenizer_fingerprint[:12]}, the store's "
                f"{tokenizer['fingerprint'][:12]})" if blocks.tokenizer_fingerprint != tokenizer["fingerprint"]
                else f"the corpus changed (fingerprint {str(corpus)[:12]}, the store's "
                     f"{str(m['blocks'].get('corpus_fingerprint'))[:12]})")
        raise StillError(f"data.source={blocks_cfg.source!r} does not give the blocks store {store_uri!r} was made "
                         f"from: {what}; rerun still infer on this text")
    source = Source(stores=(store,), blocks=blocks)
    return dataclasses.replace(source, units=scan_units(source))


# --------------------------------------------------------------------------- conversion


def hint_key(layer: str) -> str:
    """The training column of stored teacher layer ``layer`` (``Source.features``)."""
    return f"hint_{layer}"


def teacher_prefix(index: int) -> str:
    """The column prefix of store ``index``'s teacher columns in a converted batch."""
    return f"t{index}_"


def is_teacher_column(name: str) -> bool:
    """True for a store's teacher columns in a converted batch (``t0_topk_idx``…)."""
    return name[:1] == "t" and name[1:2].isdigit() and "_" in name


def convert_rows(table: pa.Table, source: Source, train: bool) -> dict[str, np.ndarray]:
    """Rows of the primary input, as read, into training arrays (module docstring).

    Args:
        table: The rows: the store columns of :meth:`Source.store_columns` (``input``
            joined), or a dataset's id, feature, label (and split) columns.
        source: The resolved :class:`Source`.
        train: Rows of the training split (they keep hint layers and views).
    """
    from still.datasets import column_matrix, decode_inputs, labels_to_numpy
    from still.datasets.splits import id_keys

    if source.kind == "blocks":
        return {"x": column_matrix(table["input_ids"])}
    if source.kind == "lm_store":
        return _lm_store_arrays(table, source)
    if source.kind == "dataset":
        spec = source.dataset
        ids = table[spec.id_column]
        return {"x": _raw_inputs(decode_inputs(table[spec.feature_column], spec, ids), source),
                "y": labels_to_numpy(table[spec.label_column], source.task, source.num_classes)}
    from teacher_infer.store import teacher_arrays

    out = {
        "x": _raw_inputs(column_matrix(table["input"]), source),
        "y": labels_to_numpy(table["label"], source.task, source.num_classes),
    }
    out.update(teacher_arrays({c: table[c] for c in table.column_names}, source.teachers[0],
                              source.max_support[0], prefix=teacher_prefix(0)))
    if train:
        for feature in source.features:
            out[hint_key(feature.layer)] = column_matrix(table[feature.column])
        if source.views > 1:
            out["aug"] = column_matrix(table["augment"]).astype(np.int16, copy=False)
            out["view"] = table["view"].to_numpy().astype(np.int16, copy=False)
            out["sample"] = id_keys(table["id"].to_numpy(zero_copy_only=False)).view(np.int64)
    return out


def bind_temperature(arrays: Mapping[str, np.ndarray], source: Source, temperature: float) -> dict[str, np.ndarray]:
    """Training arrays with every store's teacher columns bound at ``temperature``
    (``teacher_infer.targets.at_temperature``): what a run with a fixed T reads every step."""
    from teacher_infer.targets import TRAINING_COLUMNS, at_temperature

    out = dict(arrays)
    for index, spec in enumerate(source.teachers):
        prefix = teacher_prefix(index)
        if prefix + TRAINING_COLUMNS[spec.mode][0] not in out:
            continue
        columns = {prefix + name: out.pop(prefix + name) for name in TRAINING_COLUMNS[spec.mode]}
        if source.kind == "lm_store":  # one row per position while binding, one per block again after
            rows, positions = len(arrays["x"]), source.primary.positions
            columns = {k: v.reshape(rows * positions, *v.shape[2:]) for k, v in columns.items()}
            bound = at_temperature(columns, spec, temperature, prefix)
            out.update({k: v.reshape(rows, positions, *v.shape[1:]) for k, v in bound.items()})
        else:
            out.update(at_temperature(columns, spec, temperature, prefix))
    return out


def one_view_mask(sample: np.ndarray, view: np.ndarray, views: int, seed: int) -> np.ndarray:
    """The rows holding the one view drawn for each sample (``train.views=one``).

    The view is a hash of (sample key, seed): every worker that holds a sample's rows
    draws the same one, so each sample is trained on once per epoch.

    Args:
        sample: int64 sample keys (the ``sample`` training column).
        view: The rows' views.
        views: K.
        seed: The epoch's seed.
    """
    return drawn_view(sample, views, seed) == np.asarray(view, dtype=np.int64)


def drawn_view(sample: np.ndarray, views: int, seed: int) -> np.ndarray:
    """The view drawn for each sample key in an epoch with this seed (:func:`one_view_mask`)."""
    from still.datasets.splits import splitmix64

    key = splitmix64(np.array([seed], dtype=np.int64).view(np.uint64))
    drawn = splitmix64(np.asarray(sample, dtype=np.int64).view(np.uint64) ^ key) % np.uint64(views)
    return drawn.astype(np.int64)


def _lm_store_arrays(table: pa.Table, source: Source) -> dict[str, np.ndarray]:
    """Blocks of a language-model store (their tokens joined as ``input_ids``) as training arrays:
    ``x`` the tokens, ``top1`` the teacher's likeliest next token per position (for a sampled
    store, the likeliest of the drawn ones), and the
    training columns of each position (``teacher_infer.targets.prepare``), one row per
    block: ``(n, P, w)`` for per-token lists, ``(n, P)`` for per-token values."""
    from still.datasets import column_matrix
    from teacher_infer.lm_store import classifier_columns
    from teacher_infer.targets import prepare

    store = source.primary
    spec, positions, rows = store.soft_labels, store.positions, table.num_rows
    per_position = {name: column_matrix(table[name]).reshape(rows * positions, -1) for name in store.stored_columns}
    stored = classifier_columns(per_position, spec)
    if spec.mode == "topk":
        top1 = per_position["topk_idx"][:, 0]
    else:
        drawn = np.where(per_position["sample_count"] > 0, per_position["sample_logit"].astype(np.float32), -np.inf)
        top1 = np.take_along_axis(per_position["sample_idx"], drawn.argmax(axis=1)[:, None], axis=1)[:, 0]
    out = {"x": column_matrix(table["input_ids"]), "top1": top1.astype(np.int64).reshape(rows, positions)}
    for name, array in prepare(stored, spec).items():
        out[teacher_prefix(0) + name] = np.ascontiguousarray(array.reshape(rows, positions, *array.shape[1:]))
    return out


def _raw_inputs(raw: np.ndarray, source: Source) -> np.ndarray:
    """Raw input rows, flat, in their stored dtype (the device normalises them: ``Source.normalisation``)."""
    per_row = math.prod(source.input_shape)
    if raw.size != len(raw) * per_row:
        raise StillError(f"inputs of {source.name!r}: rows of {raw.size // max(len(raw), 1)} values, expected "
                         f"{per_row} {tuple(source.input_shape)}")
    return np.ascontiguousarray(raw.reshape(len(raw), per_row))


def split_codes(split: str, include_val: bool = False) -> tuple[int, ...]:
    """The split codes a named split selects (train and val for ``train`` with include_val)."""
    return (SPLITS["train"], SPLITS["val"]) if split == "train" and include_val else (SPLITS[split],)
