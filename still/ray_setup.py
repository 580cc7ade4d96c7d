"""Connecting to Ray: an embedded local cluster by default, a real one when named."""

from __future__ import annotations

import logging
import os

from still.config import RayConfig

log = logging.getLogger(__name__)

# The GCS address of the embedded cluster init_ray started in this process, if any.
_embedded_gcs_address: str | None = None
# Set in the environment of an embedded cluster's processes (raylet, Tune trials, Train
# workers inherit it), so code running there knows the cluster cannot grow either.
EMBEDDED_ENV = "STILL_EMBEDDED_RAY_CLUSTER"


def init_ray(config: RayConfig | None = None, *, address: str = "") -> str:
    """Starts or joins Ray once per process and returns how it was reached.

    Order of precedence: ``address`` (the CLI's ``--address``), ``ray.address`` in the
    config, ``$RAY_ADDRESS``, else an embedded local cluster. A process already
    connected (a Ray Jobs driver, a test's session fixture) is left as it is.

    Args:
        config: The verb's ``ray`` section.
        address: An explicit address that wins over everything else.

    Returns:
        The address in use, or ``"local"`` for an embedded cluster.
    """
    import ray

    config = config or RayConfig()
    target = address or config.address or os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        return target or "local"
    # Workers inherit the driver's environment; keep Ray's own logging quiet on the
    # console but leave progress bars alone.
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    if target:
        ray.init(address=target, **kwargs)
        return target
    if config.num_cpus:
        kwargs["num_cpus"] = config.num_cpus
    # The dashboard is what cleans up a finished trial's placement group in Tune
    # (RAY-NOTES.md); keep it, bound to loopback only.
    # address="local": start our own; a bare ray.init() would join the newest Ray instance
    # it finds on this machine (another user's or another test run's).
    os.environ[EMBEDDED_ENV] = "1"
    try:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    finally:
        # The cluster's processes have it; this one checks the address instead, so that
        # it does not claim the next cluster it may join.
        os.environ.pop(EMBEDDED_ENV, None)
    global _embedded_gcs_address
    _embedded_gcs_address = ray.get_runtime_context().gcs_address
    return "local"


def connected_to_embedded_cluster() -> bool:
    """True when this process runs on a local cluster :func:`init_ray` started: as the
    process that started it, or as one of its workers (a Tune trial, say).

    Such a cluster never grows: a resource it lacks now never arrives, so waiting for
    one is a hang, not a wait for an autoscaler.
    """
    import ray

    if not ray.is_initialized():
        return False
    if _embedded_gcs_address is not None:
        return _embedded_gcs_address == ray.get_runtime_context().gcs_address
    return os.environ.get(EMBEDDED_ENV) == "1"
