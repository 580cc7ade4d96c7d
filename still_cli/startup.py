"""Starting Ray while the stage imports: the two slowest parts of a cold start, overlapped.

A cold ``still infer`` used to import torch, pyarrow and its stage (about 2.5 s on two
cores), and only then start Ray (3–5 s, most of it waiting for the GCS, the raylet and
their agents to come up). Here Ray starts on this thread while a second one imports the
stage, which runs in those waits.

Ray starts on the main thread, not the other one: Ray ties its processes' lives to the
thread that launched them (Linux's parent-death signal follows the creating thread), so
a cluster started on a thread that then ends is killed with it.
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
        load()
    except Exception:  # noqa: BLE001 - raised again, on the main thread, by the verb's own load()
        pass
