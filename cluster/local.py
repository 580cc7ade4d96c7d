"""A real multi-node Ray cluster on this machine: ``still cluster local up|down|status``.

    still cluster local up --workers 2 --cpus-per-node 1
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.cache/still/cluster/auth_token
    still submit --address http://127.0.0.1:8275 -- still train --config c.yaml
    still cluster local down

Each node is one ``ray start --block`` process started in a session of its own: a head (GCS
on 127.0.0.1:6390, dashboard and job server on http://127.0.0.1:8275, bound to loopback) and
N workers, each with its own dashboard-agent port. Ports that are taken are replaced by free
ones and reported. Token auth is on (``RAY_AUTH_MODE=token``) with a token of this cluster's
own in ``<state-dir>/auth_token`` (mode 0600), so it never shares a token, a port or a
process with a test's embedded ``ray.init()`` or another user's Ray.

The state file ``<state-dir>/cluster.json`` records the pid and start time of each node's
``ray start`` process. ``down`` stops exactly those processes, everything in their sessions
and everything descended from them (GCS, raylets, dashboard, workers, job drivers), and
nothing else: unlike ``ray stop``, which stops every Ray process of the user.

Tests drive the same thing from Python::

    with LocalCluster.start(workers=2, cpus_per_node=1, state_dir=tmp) as cluster:
        env = {**os.environ, **cluster.client_env()}        # for subprocesses (still submit)
        subprocess.run(["still", "submit", "--address", cluster.dashboard_url, "--", ...], env=env)
        cluster.kill_worker_node(0)                          # SIGKILL the first worker's raylet
        cluster.add_worker()                                 # a replacement node joins
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from cluster import procs
from still.errors import StillError

DEFAULT_GCS_PORT = 6390  # not Ray's 6379: leave that to embedded/other clusters
DEFAULT_DASHBOARD_PORT = 8275  # not Ray's 8265
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
# Each worker node gets one unit: resources_per_worker={"still_worker": 1} puts at most one
# Ray Train worker on each worker node (and none on the head).
WORKER_RESOURCE = "still_worker"


def default_state_dir() -> Path:
    """``$STILL_CACHE_DIR/cluster`` (default ``~/.cache/still/cluster``)."""
    return Path(os.environ.get("STILL_CACHE_DIR") or Path.home() / ".cache" / "still") / "cluster"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


# Ports are picked between Ray's worker ports (10002-19999 by default) and the kernel's
# ephemeral range: a port the kernel hands out as the source port of some outgoing
# connection (Ray opens many while a node starts) can be taken again before the node binds it.
PICKED_PORTS = range(20000, 32768)


def _free_port(taken: set[int]) -> int:
    low, high, ephemeral = PICKED_PORTS.start, PICKED_PORTS.stop, _ephemeral_start()
    if ephemeral > low + 1000:
        high = min(high, ephemeral)
    while True:
        port = secrets.choice(range(low, high))
        if port not in taken and _port_free(port):
            taken.add(port)
            return port


def _ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _temp_dir_for(state_dir: Path) -> str:
    """Ray's temp dir for the cluster of ``state_dir``: one per cluster, and short.

    Clusters must not share Ray's temp dir: Ray's job supervisor points each job driver at
    the newest cluster recorded in ``<temp-dir>/ray_current_cluster``, so with the default
    ``/tmp/ray`` a job submitted here ran on whichever cluster started last on the machine
    (seen with concurrent test runs). Short, because Ray's Unix sockets live under it
    (107-byte path limit).
    """
    import hashlib

    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    return f"/tmp/still-ray-{os.getuid()}-{digest}"


def _node_temp_dir(cluster_temp_dir: str, index: int) -> str:
    """Ray's temp dir of node ``index`` (0 is the head): each node has one of its own, as
    each machine of a real cluster has its own disk.

    Nodes that share one keep runtime_env files in one ``runtime_resources`` folder: a job's
    ``--working-dir`` is unpacked there once per node with overwrite, and dropped when a
    node stops using it, so a worker node replaced (and later deleted) the directory the job
    driver on the head was running in. Seen with Ray 2.60: ``ray.init()`` in a submitted
    ``still run`` left the driver in a deleted cwd, and importing torch then aborted with
    "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so" (MKL calls getcwd()).
    """
    return cluster_temp_dir if index == 0 else f"{cluster_temp_dir}-n{index}"


def _ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise StillError("the `ray` command was not found: install ray[default]==2.60.0")
    return found


def _tail(path: str, lines: int = 5) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


class LocalCluster:
    """A head plus worker nodes on this machine, each a ``ray start --block`` process.

    Use :meth:`start` (or ``still cluster local up``) to create one and :meth:`attach` to
    reach one that is up; ``with`` stops it on exit.

    Attributes:
        state_dir: Where ``cluster.json``, ``auth_token`` and the nodes' logs live.
        address: The GCS address, ``127.0.0.1:PORT`` (what ``ray.init(address=…)`` takes).
        dashboard_url: The dashboard and job server, ``http://127.0.0.1:PORT``.
        token_path: This cluster's Ray auth token file.
    """

    def __init__(self, state: dict[str, Any], state_dir: Path):
        self._state = state
        self.state_dir = state_dir
        self.address: str = state["address"]
        self.dashboard_url: str = state["dashboard"]
        self.token_path: str = state["token_path"]
        self.temp_dir: str = state.get("temp_dir", "")
        self._popen: dict[int, subprocess.Popen] = {}  # nodes started here, reaped by us (no zombies)

    # ------------------------------------------------------------------ creating and finding
    @classmethod
    def start(
        cls,
        workers: int = 1,
        cpus_per_node: int = 1,
        state_dir: str | os.PathLike | None = None,
        *,
        head_cpus: int | None = None,
        port: int = 0,
        dashboard_port: int = 0,
        object_store_mb: int = 256,
        timeout_s: float = 90,
    ) -> LocalCluster:
        """Starts a head and ``workers`` worker nodes; returns when all have joined.

        Args:
            workers: Worker nodes besides the head (0 is a one-node cluster).
            cpus_per_node: Logical CPUs of each worker node (and of the head, unless
                ``head_cpus``); 0 splits this machine's cores among the nodes.
            state_dir: Default :func:`default_state_dir`.
            head_cpus: Logical CPUs of the head node.
            port: GCS port; 0 picks a free one. A taken port is replaced by a free one.
            dashboard_port: Dashboard / job server port, same rules.
            object_store_mb: Object store size of each node.
            timeout_s: How long the nodes may take to come up.

        Raises:
            StillError: a cluster is already up in ``state_dir``, or a node failed to start
                (its log is named; everything started is stopped again).
        """
        state_dir = Path(state_dir) if state_dir else default_state_dir()
        state_dir.mkdir(parents=True, exist_ok=True)
        existing = cls.attach(state_dir)
        if existing is not None:
            raise StillError(
                f"a local cluster is already up at {existing.address} (dashboard {existing.dashboard_url}, "
                f"state in {state_dir}): stop it first with `still cluster local down`"
            )
        (state_dir / STATE_FILE).unlink(missing_ok=True)  # stale: its processes are gone
        if workers < 0:
            raise StillError(f"--workers must be >= 0, got {workers}")
        if cpus_per_node <= 0:
            cpus_per_node = max(1, (os.cpu_count() or 1) // (workers + 1))
        taken: set[int] = set()
        notes = []

        def pick(wanted: int, what: str) -> int:
            if wanted and wanted not in taken and _port_free(wanted):
                taken.add(wanted)
                return wanted
            chosen = _free_port(taken)
            if wanted:
                notes.append(f"port {wanted} ({what}) is taken; using {chosen}")
            return chosen

        gcs_port = pick(port, "GCS")
        dash_port = pick(dashboard_port, "dashboard")
        token_path = state_dir / TOKEN_FILE
        if not token_path.is_file() or not token_path.read_text().strip():
            token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
        state: dict[str, Any] = {
            "address": f"127.0.0.1:{gcs_port}",
            "dashboard": f"http://127.0.0.1:{dash_port}",
            "token_path": str(token_path),
            "client_server_port": _free_port(taken),
            "cpus_per_node": cpus_per_node,
            "head_cpus": cpus_per_node if head_cpus is None else head_cpus,
            "object_store_mb": object_store_mb,
            "temp_dir": _temp_dir_for(state_dir),
            "cwd": os.getcwd(),
            "notes": notes,
            "nodes": [],
        }
        cluster = cls(state, state_dir)
        try:
            cluster._start_nodes(head=True, count=1, taken=taken, timeout_s=timeout_s)
            if workers:
                cluster._start_nodes(head=False, count=workers, taken=taken, timeout_s=timeout_s)
        except BaseException:
            cluster.stop(keep_logs=True)  # Ray's session logs under temp_dir say why
            raise
        return cluster

    @classmethod
    def attach(cls, state_dir: str | os.PathLike | None = None) -> LocalCluster | None:
        """The cluster recorded in ``state_dir`` if its head is still running, else None."""
        state_dir = Path(state_dir) if state_dir else default_state_dir()
        try:
            state = json.loads((state_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        cluster = cls(state, state_dir)
        head = state["nodes"][0] if state.get("nodes") else None
        if head is None or not procs.is_same_process(head["pid"], head["ticks"]):
            return None
        return cluster

    # ------------------------------------------------------------------ nodes
    def _spawn_node(self, *, head: bool, taken: set[int] | None = None) -> dict[str, Any]:
        taken = taken if taken is not None else set()
        index = len(self._state["nodes"])
        log_dir = self.state_dir / "logs"
        log_dir.mkdir(exist_ok=True)
        log = log_dir / ("head.log" if head else f"worker-{index}.log")
        agent_port = _free_port(taken)
        temp_dir = _node_temp_dir(self.temp_dir, index)
        cmd = [
            _ray_executable(), "start", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
            f"--dashboard-agent-listen-port={agent_port}",
            f"--object-store-memory={self._state['object_store_mb'] * 1024 * 1024}",
            "--num-gpus=0",
        ]  # fmt: skip
        if head:
            gcs_port = self.address.rpartition(":")[2]
            dash_port = self.dashboard_url.rpartition(":")[2]
            cmd += [
                "--head", f"--port={gcs_port}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
                f"--ray-client-server-port={self._state['client_server_port']}",
                f"--num-cpus={self._state['head_cpus']}",
            ]  # fmt: skip
        else:
            cmd += [
                f"--address={self.address}",
                f"--num-cpus={self._state['cpus_per_node']}",
                f"--resources={json.dumps({WORKER_RESOURCE: 1})}",
            ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_") and k != "RAY_ADDRESS"}
        env.update(self.client_env())
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd, env=env, cwd=self._state["cwd"], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        node = {
            "role": "head" if head else "worker",
            "pid": proc.pid,
            "ticks": procs.start_ticks(proc.pid),
            "agent_port": agent_port,
            "log": str(log),
            "temp_dir": temp_dir,
        }
        self._state["nodes"].append(node)
        self._popen[proc.pid] = proc
        self._save()
        return node

    def _start_nodes(self, *, head: bool, count: int, taken: set[int], timeout_s: float, attempts: int = 3) -> None:
        """Starts ``count`` nodes and waits for them; a node that dies while starting is
        started again (``attempts`` in all). On a loaded machine Ray gives a node only 30 s to register
        (``ray._private.node``), and a busy dashboard agent can miss that."""
        target = (0 if head else self.alive_nodes()) + count
        for attempt in range(attempts):
            new = [self._spawn_node(head=head, taken=taken) for _ in range(count)]
            try:
                if head:
                    self._wait_for_dashboard(timeout_s)
                # The head must survive its own registration too (its dashboard answers before).
                watch = new if head else [self._state["nodes"][0], *new]
                self.wait_for_nodes(target, timeout_s, watch=watch)
                return
            except StillError as exc:
                failed = [n for n in new if not procs.is_same_process(n["pid"], n["ticks"])]
                if attempt == attempts - 1 or not failed:
                    raise
                self._state["notes"].append(f"{len(failed)} node(s) failed to start, started again: {exc}")
                for node in failed:
                    procs.terminate(procs.tree({node["pid"]: node["ticks"]}))
                    self._state["nodes"].remove(node)
                count = len(failed)
                self._save()

    def _save(self) -> None:
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, indent=2))
        tmp.replace(path)

    def _check_started(self, nodes: list[dict[str, Any]] | None = None) -> None:
        for node in self._state["nodes"] if nodes is None else nodes:
            if not procs.is_same_process(node["pid"], node["ticks"]) and not self._reap_ok(node["pid"]):
                raise StillError(
                    f"the {node['role']} node exited while starting: {_tail(node['log'])} "
                    f"(logs: {node['log']}, {node.get('temp_dir', self.temp_dir)}/session_latest/logs)"
                )

    def _reap_ok(self, pid: int) -> bool:
        proc = self._popen.get(pid)
        return proc is not None and proc.poll() is None

    def _get(self, path: str, timeout: float = 2.0) -> Any:
        token = Path(self.token_path).read_text().strip()
        request = urllib.request.Request(self.dashboard_url + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def _wait_for_dashboard(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_started()
            try:
                self._get("/api/version")
                return
            except (OSError, ValueError):
                time.sleep(0.5)
        raise StillError(f"the head node's dashboard did not answer at {self.dashboard_url} within {timeout_s:.0f} s")

    def alive_nodes(self) -> int:
        """How many nodes the cluster reports ALIVE (0 when the dashboard does not answer)."""
        try:
            reply = self._get("/api/v0/nodes?limit=1000&detail=false", timeout=5)
        except (OSError, ValueError):
            return 0
        rows = reply.get("data", {}).get("result", {}).get("result", [])
        return sum(1 for row in rows if row.get("state") == "ALIVE")

    def wait_for_nodes(self, count: int, timeout_s: float = 90, watch: list[dict[str, Any]] | None = None) -> None:
        """Waits until ``count`` nodes are ALIVE.

        Raises:
            StillError: a node process in ``watch`` (default: all) exited, or ``timeout_s``
                passed.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_started(watch)
            if self.alive_nodes() >= count:
                return
            time.sleep(0.5)
        raise StillError(f"only {self.alive_nodes()} of {count} nodes joined {self.address} within {timeout_s:.0f} s")

    def add_worker(self, timeout_s: float = 90) -> int:
        """Starts one more worker node (e.g. to replace a killed one); returns its index
        among the worker nodes once it has joined."""
        self._start_nodes(head=False, count=1, taken=set(), timeout_s=timeout_s)
        return len(self._state["nodes"]) - 2

    def _worker(self, i: int) -> dict[str, Any]:
        workers = self._state["nodes"][1:]
        if not 0 <= i < len(workers):
            raise IndexError(f"worker node {i}: this cluster has {len(workers)} worker nodes (0-based)")
        return workers[i]

    def raylet_pid(self, i: int) -> int:
        """The pid of worker node ``i``'s raylet (0-based among worker nodes); 0 if gone."""
        node = self._worker(i)
        if not procs.is_same_process(node["pid"], node["ticks"]):
            return 0
        table = procs.process_table()
        for pid in procs.tree({node["pid"]: node["ticks"]}, table):
            if table[pid].name == "raylet":
                return pid
        return 0

    def kill_worker_node(self, i: int) -> int:
        """SIGKILLs worker node ``i``'s raylet, as a machine failure would; its ``ray start``
        process then stops the rest of that node. Returns the raylet's pid."""
        import signal

        pid = self.raylet_pid(i)
        if not pid:
            raise StillError(f"worker node {i} is not running")
        os.kill(pid, signal.SIGKILL)
        return pid

    # ------------------------------------------------------------------ using and stopping
    def client_env(self) -> dict[str, str]:
        """What a client of this cluster needs in its environment: ``RAY_AUTH_MODE=token``
        and ``RAY_AUTH_TOKEN_PATH`` (add ``RAY_ADDRESS=self.address`` for ``ray.init``)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    def node_pids(self) -> list[int]:
        """The pid of each node's ``ray start`` process, head first (recorded at start)."""
        return [node["pid"] for node in self._state["nodes"]]

    def all_pids(self) -> set[int]:
        """Every live process of this cluster: nodes, GCS, raylets, dashboard, workers, jobs."""
        return procs.tree({n["pid"]: n["ticks"] for n in self._state["nodes"]})

    def stop(self, keep_logs: bool = False) -> set[int]:
        """Stops exactly this cluster's processes and removes its state file and Ray's temp
        dir (session logs; ``keep_logs`` keeps them); returns the pids signalled."""
        signalled = procs.terminate(self.all_pids())
        for proc in self._popen.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        if not keep_logs and self.temp_dir:
            for temp_dir in {self.temp_dir, *(n.get("temp_dir", "") for n in self._state["nodes"])} - {""}:
                shutil.rmtree(temp_dir, ignore_errors=True)
        return signalled

    def summary(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "dashboard": self.dashboard_url,
            "token_path": self.token_path,
            "ray_temp_dir": self.temp_dir,
            "nodes": len(self._state["nodes"]),
            "state_dir": str(self.state_dir),
        }

    def __enter__(self) -> LocalCluster:  # noqa: PYI034 (Python 3.10: no typing.Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dashboard_for_gcs(address: str, state_dir: str | os.PathLike | None = None) -> str:
    """The dashboard URL of the local cluster whose GCS is ``address``, or ``""``."""
    cluster = LocalCluster.attach(state_dir)
    if cluster is None:
        return ""
    host, _, port = address.rpartition(":")
    ours_host, _, ours_port = cluster.address.rpartition(":")
    if port == ours_port and host in (ours_host, "localhost", "127.0.0.1"):
        return cluster.dashboard_url
    return ""


def _usage(cluster: LocalCluster) -> str:
    return (
        f"Ray cluster up: GCS {cluster.address}, dashboard and job server {cluster.dashboard_url}\n"
        f"  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={cluster.token_path}\n"
        f"  still submit --address {cluster.dashboard_url} -- still train --config CONFIG.yaml\n"
        f"  export RAY_ADDRESS={cluster.address}   # for ray.init() / still VERB --address\n"
        f"  still cluster local down"
    )


def cli_cluster(args: argparse.Namespace) -> dict[str, Any]:
    """``still cluster local up|down|status``."""
    state_dir = Path(args.state_dir).expanduser() if args.state_dir else default_state_dir()
    if args.action == "up":
        started = time.monotonic()
        cluster = LocalCluster.start(
            workers=args.workers,
            cpus_per_node=args.cpus_per_node,
            state_dir=state_dir,
            port=DEFAULT_GCS_PORT if args.port is None else args.port,
            dashboard_port=DEFAULT_DASHBOARD_PORT if args.dashboard_port is None else args.dashboard_port,
        )
        for note in cluster._state["notes"]:
            print(f"still: {note}", file=sys.stderr)
        if not args.json:
            print(_usage(cluster))
        return {**cluster.summary(), "up": True, "seconds": round(time.monotonic() - started, 1)}
    cluster = LocalCluster.attach(state_dir)
    if args.action == "status":
        if cluster is None:
            return {"up": False, "state_dir": str(state_dir)}
        return {**cluster.summary(), "up": True, "alive_nodes": cluster.alive_nodes()}
    # down
    if cluster is None:
        stale = state_dir / STATE_FILE
        if stale.exists():  # the head is gone; stop whatever of the rest is left
            state = json.loads(stale.read_text())
            signalled = LocalCluster(state, state_dir).stop()
            return {"up": False, "stopped": len(signalled), "state_dir": str(state_dir)}
        return {"up": False, "stopped": 0, "state_dir": str(state_dir), "note": "no local cluster was up"}
    signalled = cluster.stop()
    return {"up": False, "stopped": len(signalled), "address": cluster.address, "dashboard": cluster.dashboard_url}
