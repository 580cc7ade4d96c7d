"""Starting Ray while a stage imports: two slow parts of a cold start, overlapped.

``still run`` starts one Ray instance for all its stages before the first one; here it
starts on this thread while a second one imports Ray Data and the first stage (torch,
pyarrow: 2–3 s on two cores), which runs in ``ray.init``'s waits for the GCS, the raylet
and their agents (3–5 s).

Ray starts on the main thread, not the other one: Ray ties its processes' lives to the
thread that launched them (Linux's parent-death signal follows the creating thread), so
a cluster started on a thread that then ends is killed with it.

A single verb does not start Ray this way. Tried on ``still infer`` (2026-12-05, 2
cores, a 200k-row store, 3 runs each): 1.5 s faster (22.2 s against 23.8 s), but a bad
input, which the stage finds before it needs Ray, then waited for Ray to start and stop:
``data.source`` naming nothing failed in 8.4 s instead of 2.1 s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from still.config import RayConfig
from still.ray_setup import init_ray


def start_ray_while_importing(ray_config: RayConfig, load: Callable[[], Any], *, dashboard: bool) -> None:
    """Starts or joins Ray (:func:`still.ray_setup.init_ray`) while ``load`` imports the stage.

    Args:
        ray_config: The verb's ``ray`` section.
        load: Imports what the verb runs (:attr:`still_cli.verbs.Verb.load`). An error
            there is left for the verb's own call of ``load`` to raise.
        dashboard: Whether an embedded cluster runs Ray's dashboard.
    """
    loader = threading.Thread(target=_quietly, args=(load,), name="import-stage", daemon=True)
    loader.start()
    try:
        init_ray(ray_config, dashboard=dashboard)
    finally:
        loader.join()


def _quietly(load: Callable[[], Any]) -> None:
    try:
        import ray.data  # noqa: F401  (every verb that starts Ray uses Ray Data; init_ray imports it last)

        load()
    except Exception:  # noqa: BLE001 - raised again, on the main thread, by the verb's own load()
        pass
