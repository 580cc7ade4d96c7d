"""Does the Ray cluster have room for the training workers? Checked before ``fit()``.

Ray Train waits, silently and forever, for a placement group that cannot be scheduled
(``use_gpu`` on a CPU-only cluster, a custom resource no node carries, ``STRICT_SPREAD``
over too few nodes, no CPU left for Ray Data's read tasks: RAY-NOTES.md). This module
turns those waits into an error that names the config key to change.

On an embedded local cluster nothing can join later, so a misfit is an error. On a
cluster joined by address an autoscaler may still add nodes, so it is only a warning.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence

from still.errors import StillError

# Room for float error in fractional resources (0.1 CPU × 10 workers on 1 CPU).
_EPS = 1e-6
# The smallest CPU share worth suggesting to a worker (what _auto_cpus goes down to).
_MIN_WORKER_CPU = 0.1


def worker_demand(cpus_per_worker: float, gpus_per_worker: float, custom: Mapping[str, float]) -> dict[str, float]:
    """The resources one training worker reserves (``gpus_per_worker``: 0, or a share in (0, 1])."""
    demand = {"CPU": float(cpus_per_worker), "GPU": float(gpus_per_worker), **{k: float(v) for k, v in custom.items()}}
    return {k: v for k, v in demand.items() if v > 0}


def workers_that_fit(nodes: Sequence[Mapping[str, float]], demand: Mapping[str, float], strategy: str) -> int:
    """How many workers of ``demand`` the nodes can hold under a placement strategy.

    Args:
        nodes: Each alive node's total resources.
        demand: One worker's resources.
        strategy: ``PACK``, ``SPREAD``, ``STRICT_PACK`` (all on one node) or
            ``STRICT_SPREAD`` (one per node).
    """
    per_node = [min((math.floor(node.get(k, 0.0) / v + _EPS) for k, v in demand.items()), default=0)
                for node in nodes]
    if strategy == "STRICT_PACK":
        return max(per_node, default=0)
    if strategy == "STRICT_SPREAD":
        return sum(1 for n in per_node if n >= 1)
    return sum(per_node)


def _key_for(resource: str) -> str:
    if resource == "CPU":
        return "scaling.cpus_per_worker"
    if resource == "GPU":
        return "scaling.use_gpu"
    return f"scaling.resources_per_worker.{resource}"


def misfit(nodes: Sequence[Mapping[str, float]], demand: Mapping[str, float], strategy: str,
           min_workers: int) -> str | None:
    """Says why ``min_workers`` workers cannot start on these nodes, or None when they can.

    Args:
        nodes: Each alive node's total resources.
        demand: One worker's resources (:func:`worker_demand`).
        strategy: The placement strategy.
        min_workers: Workers that must fit (the lower bound of elastic training).
    """
    fit = workers_that_fit(nodes, demand, strategy)
    totals = {k: sum(node.get(k, 0.0) for node in nodes) for k in demand}
    cluster = ", ".join(f"{k}={totals[k]:g}" for k in demand)
    ask = ", ".join(f"{k}={v:g}" for k, v in demand.items())
    if fit < min_workers:
        for resource, amount in demand.items():
            alone = workers_that_fit(nodes, {resource: amount}, "PACK")
            if alone < min_workers:
                return (f"{_key_for(resource)}: {min_workers} worker(s) × {resource}={amount:g} do not fit the Ray "
                        f"cluster ({len(nodes)} node(s), {cluster}); at most {alone} would")
        if strategy.startswith("STRICT_") and workers_that_fit(nodes, demand, "PACK") >= min_workers:
            return (f"scaling.placement_strategy={strategy}: {min_workers} worker(s) of {{{ask}}} do not fit the "
                    f"{len(nodes)} node(s) of the Ray cluster ({cluster}) that way; at most {fit} would")
        return (f"scaling: {min_workers} worker(s) of {{{ask}}} do not fit the Ray cluster ({len(nodes)} node(s), "
                f"{cluster}): too few nodes carry all of it at once; at most {fit} would")
    return None


def alive_node_resources() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def check_workers_fit(demand: Mapping[str, float], strategy: str, min_workers: int, *, embedded: bool) -> None:
    """Fails fast when the training workers cannot be scheduled on the connected cluster.

    Raises:
        StillError: On an ``embedded`` local cluster, when they do not fit; the message
            names the config key to change. A cluster joined by address gets a warning
            on stderr instead (an autoscaler may add the nodes).
    """
    problem = misfit(alive_node_resources(), demand, strategy, min_workers)
    if problem is None:
        return
    if embedded:
        raise StillError(problem)
    print(f"still train: warning: {problem}; training waits until the cluster grows", file=sys.stderr, flush=True)

