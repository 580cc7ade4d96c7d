"""Running still on a Ray cluster.

- :mod:`cluster.submit`: ``still submit`` and ``still jobs`` over the Ray Jobs SDK.
- :mod:`cluster.runtime_env`: the job's runtime_env (working_dir + excludes, env_vars, pip)
  and redaction of what gets printed.
- :mod:`cluster.auth`: the Ray token the job client sends, and the errors when it is missing.
- :mod:`cluster.local`: ``still cluster local up|down|status`` and :class:`LocalCluster`, a real
  multi-node Ray cluster on this machine for trying things out and for tests.
- ``cluster/specs/``: KubeRay RayCluster/RayJob manifests and a cluster-launcher YAML.

Imports only ``still`` (and Ray, lazily).
"""
