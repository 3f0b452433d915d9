"""A cluster of `mediamesh node` processes for the Python end-to-end tests.

Like ``tests/common/cluster.rs`` (the Rust tests' ``ProcessCluster``): every node gets the same
``--api-secret`` and ``--cluster-secret``, a ``--region``, and all but the first ``--join`` the
first one's cluster address; the first bootstraps the store. ``start()`` returns once every node
answers ``/readyz`` and every node's ``GET /admin/v1/cluster`` lists all of them as voters, with
the same leader (and, by default, all ``alive``)::

    from cluster import Cluster
    c = Cluster(tmp_path_factory.mktemp("cluster")).start()     # n1 seoul, n2 seoul, n3 busan
    c["n3"].base, c.admin_token, c.status("n1"), c.leader()
    c.stop()

As a module fixture::

    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory):
        with Cluster(tmp_path_factory.mktemp("cluster")) as c:
            yield c
"""

from __future__ import annotations

import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import pytest
import requests

from conftest import Node, require_binary, stop_node, wait_until

DEFAULT_NODES: tuple[tuple[str, str], ...] = (("n1", "seoul"), ("n2", "seoul"), ("n3", "busan"))


class Cluster:
    """``nodes`` = [(node id, region)]; the first bootstraps, the others join it."""

    def __init__(self, workdir: Path, nodes: Sequence[tuple[str, str]] = DEFAULT_NODES, *,
                 extra_args: Iterable[str] = (), extra_env: Optional[dict] = None,
                 capture_stderr: bool = True, media_ports: int = 200):
        assert nodes, "a cluster needs at least one node"
        self.workdir = Path(workdir)
        self.secret = secrets.token_hex(24)
        self.cluster_secret = self.secret
        binary = require_binary()
        self.nodes: list[Node] = []
        first_cluster: Optional[str] = None
        for i, (node_id, region) in enumerate(nodes):
            # --join needs the first node's cluster port, which Node picks in its constructor
            args = ["--region", region, "--cluster-secret", self.cluster_secret]
            if i > 0:
                args += ["--join", first_cluster]
            node = Node(binary, self.workdir / node_id, node_id=node_id, media_ports=media_ports,
                        extra_args=[*args, *extra_args], extra_env=extra_env,
                        capture_stderr=capture_stderr)
            node.secret = self.secret  # one --api-secret for all: tokens are valid on every node
            node.region = region
            node.workdir.mkdir(parents=True, exist_ok=True)
            if i == 0:
                first_cluster = f"127.0.0.1:{node.cluster_port}"
            self.nodes.append(node)
        self._admin_token: Optional[str] = None

    # ---- access ---------------------------------------------------------------------------------
    def __getitem__(self, node_id: str) -> Node:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)

    def __iter__(self):
        return iter(self.nodes)

    @property
    def ids(self) -> list[str]:
        return [n.node_id for n in self.nodes]

    @property
    def admin_token(self) -> str:
        """An admin-grant token (room "*"), valid on every node."""
        if self._admin_token is None:
            self._admin_token = self.nodes[0].token("*", "e2e-ops", admin=True)
        return self._admin_token

    def get(self, node_id: str, path: str, timeout: float = 5) -> requests.Response:
        """``GET path`` on ``node_id`` with the admin token."""
        return self[node_id].get(path, self.admin_token, timeout=timeout)

    def status(self, node_id: str) -> dict:
        """``GET /admin/v1/cluster`` of ``node_id`` (raises on a non-200 answer)."""
        r = self.get(node_id, "/admin/v1/cluster", timeout=2)
        r.raise_for_status()
        return r.json()

    def leader(self) -> Optional[str]:
        """The store leader as seen by the first running node that knows one."""
        for n in self.nodes:
            if not n.alive():
                continue
            try:
                leader = self.status(n.node_id).get("leader")
            except (requests.RequestException, ValueError):
                continue
            if leader:
                return leader
        return None

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0, require_alive: bool = True) -> "Cluster":
        """Starts the nodes (the first, then the others), waits until all are voters (and alive)
        on every node with one leader. Fails the test (and stops what started) otherwise."""
        t0 = time.monotonic()
        try:
            for n in self.nodes:
                n.start(ready_timeout=max(5.0, timeout - (time.monotonic() - t0)))
            self.wait_all_voters(max(5.0, timeout - (time.monotonic() - t0)), require_alive)
        except Exception as e:
            tails = "\n".join(f"--- {n.node_id} log (tail) ---\n{n.log_tail(40)}" for n in self.nodes)
            self.stop()
            pytest.fail(f"cluster did not start: {e}\n{tails}", pytrace=False)
        print(f"[e2e] cluster {self.ids} up in {time.monotonic() - t0:.1f}s, leader {self.leader()}")
        return self

    def all_voters(self, require_alive: bool = True) -> bool:
        count = len(self.nodes)
        statuses = [self.status(n.node_id) for n in self.nodes]
        leaders = {s.get("leader") for s in statuses}
        if len(leaders) != 1 or not isinstance(next(iter(leaders)), str):
            return False
        for s in statuses:
            nodes = s.get("nodes") or []
            if len(nodes) != count or any(x.get("membership") != "voter" for x in nodes):
                return False
            if require_alive and any(x.get("state") != "alive" for x in nodes):
                return False
        return True

    def wait_all_voters(self, timeout: float = 30.0, require_alive: bool = True) -> None:
        wait_until(lambda: self.all_voters(require_alive), timeout, interval=0.1,
                   what=f"{len(self.nodes)} voters{' (alive)' if require_alive else ''} with one leader")

    def stop(self) -> None:
        """Stops every node at once with SIGINT (SIGKILL after 10 s). Not SIGTERM: a draining
        node would move its rooms to nodes that are stopping too and wait out its deadline."""
        running = [n for n in self.nodes if n.proc is not None]
        threads = [threading.Thread(target=stop_node, args=(n, signal.SIGINT), daemon=True) for n in running]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

    def log_tails(self, lines: int = 60) -> str:
        return "\n".join(f"--- {n.node_id} ---\n{n.log_tail(lines)}" for n in self.nodes)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
