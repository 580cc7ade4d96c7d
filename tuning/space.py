"""From the ``space`` and ``tune`` sections to a Ray Tune search space and searcher.

``resolve_space`` checks every dimension up front (empty lists, inverted or empty
ranges, ``log`` ranges that touch zero, values outside a key's domain, ranges under
the grid searcher) and returns plain :class:`Dimension` records; ``param_space`` and
``build_search_alg`` turn them into what ``ray.tune.Tuner`` takes:

| searcher | a list | a range ``{low, high}`` | ``log: true`` |
|---|---|---|---|
| ``grid`` | ``tune.grid_search`` | error: a grid needs lists | — |
| ``random`` | ``tune.choice`` | ``tune.uniform`` / ``tune.randint`` | ``loguniform`` / ``lograndint`` |
| ``optuna`` | ``tune.choice`` | the same (OptunaSearch converts them to Optuna distributions) | the same |

Trial config keys are the space names (``temperature``, ``weight``, ``width``, ``lr``, ``hint_weight``,
``depth``, ``divergence``); :data:`CONFIG_KEYS` maps them to the dotted TrainConfig keys.
``divergence`` is the one categorical key: a list of names from
``student_train.losses.DIVERGENCES``, never a range.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from still.errors import StillError

# space key -> the TrainConfig key it sets in each trial.
CONFIG_KEYS: dict[str, str] = {
    "temperature": "kd.temperature",
    "weight": "kd.weight",
    "width": "student.width",
    "lr": "train.lr",
    "hint_weight": "kd.hint_weight",
    "depth": "student.depth",
    "divergence": "kd.divergence",
}

_DEFAULTS: dict[str, Any] = {
    "temperature": (1.0, 2.0, 4.0, 8.0),
    "weight": (0.5, 0.7, 0.9),
}
_DEFAULT_WIDTH = {"mlp": (32, 64, 128, 256), "cnn": (0.25, 0.5, 1.0), "llama": (64, 128, 256)}


def _in_domain(key: str, value: float) -> bool:
    if key == "weight":
        return 0.0 <= value <= 1.0
    if key == "hint_weight":
        return value >= 0
    if key == "depth":
        return value >= 1 and float(value).is_integer()
    return value > 0


_DOMAIN_TEXT = {"temperature": "> 0", "weight": "in [0, 1]", "width": "> 0", "lr": "> 0", "hint_weight": ">= 0",
                "depth": "a whole number >= 1"}


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One swept key, checked.

    Attributes:
        key: A key of :data:`CONFIG_KEYS`.
        values: The list of values (names for ``divergence``), or None for a range.
        low: Range lower bound (inclusive).
        high: Range upper bound (inclusive for integers, exclusive-ish for floats).
        log: Sample the range log-uniformly.
        integer: Sample integers (width ranges with integer bounds).
    """

    key: str
    values: tuple | None = None
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False

    def describe(self) -> str:
        """A short human description, e.g. ``[1, 2, 4]`` or ``log[1, 20]``."""
        if self.values is not None:
            return "[" + ", ".join(v if isinstance(v, str) else f"{v:g}" for v in self.values) + "]"
        kind = ("int" if self.integer else "") + ("log" if self.log else "")
        return f"{kind}[{self.low:g}, {self.high:g}]"


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StillError(f"space.{key}: values must be finite numbers, got {value!r}")
    return value


def _divergences(raw: Any) -> Dimension:
    from student_train.losses import DIVERGENCES

    names = (raw,) if isinstance(raw, str) else raw
    if not isinstance(names, (list, tuple)) or not names:
        raise StillError(f"space.divergence must be a list of names from {', '.join(DIVERGENCES)}, got {raw!r}")
    bad = [name for name in names if name not in DIVERGENCES]
    if bad:
        raise StillError(f"space.divergence: {bad[0]!r} is not one of {', '.join(DIVERGENCES)}")
    if len(set(names)) != len(names):
        raise StillError(f"space.divergence lists a value twice: {list(names)}")
    return Dimension("divergence", values=tuple(names))


def _dimension(key: str, raw: Any, searcher: str) -> Dimension:
    where = f"space.{key}"
    if key == "divergence":
        return _divergences(raw)
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        raw = (raw,)
    if isinstance(raw, (list, tuple)):
        if not raw:
            raise StillError(f"{where} is an empty list; give at least one value")
        values = tuple(_number(key, v) for v in raw)
        bad = [v for v in values if not _in_domain(key, v)]
        if bad:
            raise StillError(f"{where} values must be {_DOMAIN_TEXT[key]}, got {bad[0]!r}")
        if len(set(values)) != len(values):
            raise StillError(f"{where} lists a value twice: {list(values)}")
        return Dimension(key, values=values)
    if isinstance(raw, Mapping):
        unknown = sorted(set(raw) - {"low", "high", "log"})
        if unknown:
            raise StillError(f"{where}: unknown range key {unknown[0]!r}; a range is {{low, high, log}}")
        if "low" not in raw or "high" not in raw:
            raise StillError(f"{where}: a range needs both low and high, got {dict(raw)}")
        low, high = _number(key, raw["low"]), _number(key, raw["high"])
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise StillError(f"{where}.log must be true or false, got {log!r}")
        if not low < high:
            raise StillError(f"{where}: low must be < high, got low={low:g} high={high:g}")
        for bound in (low, high):
            if not _in_domain(key, bound):
                raise StillError(f"{where}: bounds must be {_DOMAIN_TEXT[key]}, got {bound:g}")
        if log and low <= 0:
            raise StillError(f"{where}: a log range needs low > 0, got {low:g}")
        if searcher == "grid":
            raise StillError(
                f"{where}: tune.searcher=grid needs a list of values, got a range; "
                "use a list or tune.searcher=random|optuna"
            )
        integer = key == "width" and isinstance(raw["low"], int) and isinstance(raw["high"], int)
        return Dimension(key, low=float(low), high=float(high), log=log, integer=integer)
    raise StillError(f"{where} must be a list of values or a range {{low, high}}, got {raw!r}")


def resolve_space(space: Any, searcher: str, family: str) -> dict[str, Dimension]:
    """Checks the ``space`` section and fills the defaults.

    Args:
        space: The ``space`` section (a :class:`tuning.config.SpaceSection`).
        searcher: ``grid``, ``random`` or ``optuna``.
        family: The student family (picks the default widths).

    Returns:
        ``{key: Dimension}`` for every swept key, in CONFIG_KEYS order.

    Raises:
        StillError: One line naming the first bad key.
    """
    dims: dict[str, Dimension] = {}
    for key in CONFIG_KEYS:
        raw = getattr(space, key)
        if raw is None:
            if key == "width":
                raw = _DEFAULT_WIDTH.get(family)
            else:
                raw = _DEFAULTS.get(key)
            if raw is None:
                continue
        dims[key] = _dimension(key, raw, searcher)
    return dims


def grid_size(dims: Mapping[str, Dimension]) -> int:
    """Number of combinations of the list dimensions (1 when there are none)."""
    return math.prod(len(d.values) for d in dims.values() if d.values is not None)


def num_trials(dims: Mapping[str, Dimension], searcher: str, num_samples: int) -> int:
    """How many trials Tune will run: the grid times num_samples for grid, else num_samples."""
    return grid_size(dims) * num_samples if searcher == "grid" else num_samples


def param_space(dims: Mapping[str, Dimension], searcher: str) -> dict[str, Any]:
    """Returns the Tune ``param_space`` over the swept keys."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, dim in dims.items():
        if dim.values is not None:
            values = list(dim.values)
            space[key] = tune.grid_search(values) if searcher == "grid" else tune.choice(values)
        elif dim.integer:
            low, high = int(dim.low), int(dim.high) + 1  # randint excludes high
            space[key] = tune.lograndint(low, high) if dim.log else tune.randint(low, high)
        else:
            space[key] = tune.loguniform(dim.low, dim.high) if dim.log else tune.uniform(dim.low, dim.high)
    return space


def build_search_alg(searcher: str, *, seed: int, max_concurrent: int) -> Any:
    """Returns the Tune search algorithm for ``tune.searcher``.

    ``grid`` and ``random`` share Tune's BasicVariantGenerator (grid entries expand,
    choices sample, seeded); ``optuna`` is OptunaSearch with a seeded TPE sampler,
    wrapped in a ConcurrencyLimiter when trials are capped. The cap is set here
    rather than through ``TuneConfig.max_concurrent_trials``, which Tune ignores for a
    BasicVariantGenerator passed in; metric and mode come from ``ray.tune.TuneConfig``.
    """
    if searcher in ("grid", "random"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)
    if searcher == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        search = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))
        return ConcurrencyLimiter(search, max_concurrent=max_concurrent) if max_concurrent else search
    raise StillError(f"tune.searcher must be one of grid, random, optuna; got {searcher!r}")
