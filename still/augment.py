"""Image augmentations described by a few integers per view, so that they replay exactly.

    augment = AugmentConfig(jitter=2, crop=24, flip=True)
    augment.check((1, 28, 28), "store.augment")                      # StillError naming the key
    params = view_params(augment, (1, 28, 28), ids, views, seed)      # int16 (n, P): one row per (id, view)
    params = random_params(augment, (1, 28, 28), n, generator)        # int16 (n, P): drawn on the fly
    x = apply_augment(augment, x, params, background)                 # (n, C, H, W) on any device

A view is its parameters (:func:`param_names`): a crop (``crop_y``, ``crop_x``,
``crop_side``; side 0 is no crop), a horizontal flip bit (``flip``) and a shift
(``dy``, ``dx``). They are applied in that order to the normalised input: the square
``crop_side`` crop at (``crop_y``, ``crop_x``) resized back to the input size
(bilinear), mirrored when ``flip``, then translated by (dy, dx) with the vacated pixels
set to ``background`` (the normalised black pixel, so a shift means the same whatever
the normalisation). All-zero parameters are the identity: view 0 of a multi-view store.

The teacher (``still infer``) and the student (``still train``) call the same
:func:`apply_augment` on the same parameters: the store keeps them per row, so a
student's input is exactly the view whose teacher output it is trained against.
Parameters of stored views are a hash of (seed, id, view), so a shard written again
after a kill holds the same views.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from still.errors import StillError


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation of image inputs (channels, height, width); nothing set: none."""

    jitter: int = 0
    """Random translation by up to ±jitter pixels in each direction, zero (black) fill
    (Hinton et al. 2015: 2 on MNIST)."""
    crop: int = 0
    """Side of a random square crop, resized back to the input size (bilinear); 0: no crop.
    Must fit the image."""
    flip: bool = False
    """Mirror left-right with probability 1/2 (not for digits)."""

    @property
    def enabled(self) -> bool:
        """True when any augmentation is set."""
        return bool(self.jitter or self.crop or self.flip)

    def validate(self, key: str) -> None:
        """Checks the values alone (the input shape is checked by :meth:`check`).

        Raises:
            StillError: Naming ``key`` (``store.augment``, ``train.augment``).
        """
        if self.jitter < 0:
            raise StillError(f"{key}.jitter must be >= 0 (pixels), got {self.jitter}")
        if self.crop < 0:
            raise StillError(f"{key}.crop must be >= 0 (0: no crop), got {self.crop}")

    def check(self, input_shape: Sequence[int], key: str) -> None:
        """Checks that the augmentation fits inputs of ``input_shape``.

        Raises:
            StillError: The inputs are not images, the crop is larger than the image, or
                the shift is not smaller than it (naming ``key`` and the shape).
        """
        if not self.enabled:
            return
        shape = tuple(int(v) for v in input_shape)
        if len(shape) != 3:
            raise StillError(f"{key} augments images (channels, height, width); the inputs have shape {shape}")
        _, height, width = shape
        if self.crop > min(height, width):
            raise StillError(f"{key}.crop={self.crop} does not fit the input shape {shape}: a crop side must be at "
                             f"most {min(height, width)}")
        if self.jitter >= min(height, width):
            raise StillError(f"{key}.jitter={self.jitter} shifts images of shape {shape} out of the frame: it must "
                             f"be below {min(height, width)}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values (manifests, messages)."""
        return dataclasses.asdict(self)


def param_names(augment: AugmentConfig) -> tuple[str, ...]:
    """The per-view parameters of ``augment``, in the order of a params row."""
    names: list[str] = []
    if augment.crop:
        names += ["crop_y", "crop_x", "crop_side"]
    if augment.flip:
        names.append("flip")
    if augment.jitter:
        names += ["dy", "dx"]
    return tuple(names)


def _ranges(augment: AugmentConfig, input_shape: Sequence[int]) -> list[tuple[int, int]]:
    """Inclusive (low, high) of each parameter of a drawn (not identity) view."""
    _, height, width = input_shape
    ranges: list[tuple[int, int]] = []
    if augment.crop:
        ranges += [(0, height - augment.crop), (0, width - augment.crop), (augment.crop, augment.crop)]
    if augment.flip:
        ranges.append((0, 1))
    if augment.jitter:
        ranges += [(-augment.jitter, augment.jitter)] * 2
    return ranges


def view_params(augment: AugmentConfig, input_shape: Sequence[int], id_keys: np.ndarray, views: np.ndarray,
                seed: int) -> np.ndarray:
    """The parameters of stored views: a hash of (seed, id, view); view 0 is all zeros.

    Args:
        augment: The store's augmentation.
        input_shape: Shape of one input.
        id_keys: uint64 keys of the rows' ids (:func:`still.datasets.splits.id_keys`).
        views: The rows' view numbers.
        seed: The store's seed.

    Returns:
        int16 ``(n, len(param_names(augment)))``.
    """
    from still.datasets.splits import splitmix64

    ranges = _ranges(augment, input_shape)
    views = np.asarray(views, dtype=np.uint64)
    out = np.zeros((len(views), len(ranges)), dtype=np.int16)
    base = splitmix64(np.asarray(id_keys, dtype=np.uint64) ^ splitmix64(np.array([seed], dtype=np.uint64)))
    with np.errstate(over="ignore"):
        for column, (low, high) in enumerate(ranges):
            hashed = splitmix64(base ^ splitmix64(views * np.uint64(64) + np.uint64(column)))
            out[:, column] = low + (hashed % np.uint64(high - low + 1)).astype(np.int64)
    out[views == 0] = 0
    return out


def random_params(augment: AugmentConfig, input_shape: Sequence[int], n: int, generator: Any) -> Any:
    """Parameters drawn on the fly from a CPU ``torch.Generator`` (the same draws on any device).

    Returns:
        int16 tensor ``(n, len(param_names(augment)))`` on the CPU.
    """
    import torch

    columns = [torch.randint(low, high + 1, (n,), generator=generator) for low, high in _ranges(augment, input_shape)]
    return torch.stack(columns, 1).to(torch.int16) if columns else torch.zeros((n, 0), dtype=torch.int16)


def apply_augment(augment: AugmentConfig, x: Any, params: Any, background: Any) -> Any:
    """Applies each row's view (module docstring) to normalised images.

    Args:
        augment: What ``params`` describe (:func:`param_names`).
        x: ``(n, C, H, W)`` float model inputs.
        params: ``(n, P)`` integer tensor on ``x``'s device.
        background: ``(1, C, H, W)`` or broadcastable: the normalised black pixel.

    Returns:
        The augmented inputs, same shape and device.
    """
    import torch

    if not augment.enabled:
        return x
    columns = dict(zip(param_names(augment), params.long().unbind(1)))
    x = x - background
    if augment.crop:
        x = _crop_resize(x, columns["crop_y"], columns["crop_x"], columns["crop_side"] > 0, augment.crop)
    if augment.flip:
        x = torch.where(columns["flip"].bool()[:, None, None, None], x.flip(3), x)
    if augment.jitter:
        x = _shift(x, columns["dy"], columns["dx"], augment.jitter)
    return x + background


def _crop_resize(x: Any, top: Any, left: Any, cropped: Any, side: int) -> Any:
    import torch
    import torch.nn.functional as F

    rows_cropped = torch.nonzero(cropped).flatten()
    if len(rows_cropped) == 0:
        return x
    n, channels, height, width = x.shape
    top, left = top.index_select(0, rows_cropped), left.index_select(0, rows_cropped)
    rows = top[:, None] + torch.arange(side, device=x.device)
    cols = left[:, None] + torch.arange(side, device=x.device)
    picked = x.index_select(0, rows_cropped).permute(0, 2, 3, 1)
    patch = picked[torch.arange(len(rows_cropped), device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    resized = F.interpolate(patch.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", align_corners=False)
    out = x.clone()
    out.index_copy_(0, rows_cropped, resized.to(x.dtype))
    return out


def _shift(x: Any, dy: Any, dx: Any, pixels: int) -> Any:
    """Each image moved by (dy, dx): the pixel at (r, c) comes from (r + dy, c + dx), zero outside."""
    import torch
    import torch.nn.functional as F

    n, _, height, width = x.shape
    padded = F.pad(x, (pixels, pixels, pixels, pixels)).permute(0, 2, 3, 1)
    rows = (dy + pixels)[:, None] + torch.arange(height, device=x.device)
    cols = (dx + pixels)[:, None] + torch.arange(width, device=x.device)
    shifted = padded[torch.arange(n, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return shifted.permute(0, 3, 1, 2).contiguous()


def background_of(normalisation: Any, device: Any) -> Any:
    """The normalised black pixel of ``normalisation``'s inputs, ``(1, *input_shape)`` on ``device``."""
    import torch

    return normalisation.apply(torch.zeros((1, *normalisation.input_shape), device=device))
