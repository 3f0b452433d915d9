"""Fixtures for the mediamesh end-to-end tests: a node process, tokens, Chromium, page server.

``node`` is one default node per module; ``node_factory`` starts nodes with extra CLI arguments,
extra (or removed) environment variables and stderr in a file of its own (``Node.stderr_path``).

Environment:
  MEDIAMESH_BIN             the node binary (default <repo>/target/debug/mediamesh)
  MEDIAMESH_E2E_SKIP_MISSING=1   skip (instead of fail) node tests when the binary is missing
  MEDIAMESH_E2E_KEEP=1      keep the node's temporary data dir (its path is printed)
"""

from __future__ import annotations

import functools
import http.server
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import pytest
import requests

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PAGES = HERE / "pages"
sys.path.insert(0, str(HERE))

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream", "--allow-loopback-in-peer-connection",
    # plain IPs instead of mDNS .local names in host candidates (no multicast lookups)
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _udp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_udp_port() -> int:
    for _ in range(100):
        p = random.randint(20000, 29999)
        if _udp_free(p) and _tcp_free(p):
            return p
    raise RuntimeError("no free UDP port")


def _tcp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_udp_range(size: int) -> tuple[int, int]:
    """A UDP port range below the kernel's ephemeral range (where aiortc/Chromium bind)."""
    for _ in range(50):
        lo = random.randrange(20000, 30000 - size, 10)
        probe = [lo, lo + size // 2, lo + size - 1]
        if all(_udp_free(p) for p in probe):
            return lo, lo + size - 1
    raise RuntimeError("no free UDP port range")


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; raise TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = predicate()
        except Exception as e:  # keep polling through transient errors, report the last one
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def parse_metric(text: str, name: str) -> Optional[float]:
    """Sum of all samples of ``name`` (any labels) in Prometheus text; None if absent."""
    total, found = 0.0, False
    # label values are quoted and may contain braces (route="/admin/v1/rooms/{room}")
    pat = re.compile(r"^" + re.escape(name) + r'(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)')
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            total += float(m.group(2))
            found = True
    return total if found else None


# ------------------------------------------------------------------------------------------------
# the node
# ------------------------------------------------------------------------------------------------
def node_binary() -> Path:
    return Path(os.environ.get("MEDIAMESH_BIN", REPO / "target" / "debug" / "mediamesh")).absolute()


def require_binary() -> Path:
    b = node_binary()
    if b.is_file() and (os.access(b, os.X_OK) or b.suffix == ".py"):
        return b
    msg = (f"mediamesh binary not found or not executable: {b} "
           f"(build it with `cargo build`, or point MEDIAMESH_BIN at it)")
    if os.environ.get("MEDIAMESH_E2E_SKIP_MISSING") == "1":
        pytest.skip(msg)
    pytest.fail(msg, pytrace=False)


class Node:
    """One `mediamesh node` process on loopback ports, with helpers for its HTTP API."""

    def __init__(self, binary: Path, workdir: Path, node_id: str = "e2e-1", media_ports: int = 400,
                 *, extra_args=(), extra_env: Optional[dict] = None, capture_stderr: bool = False):
        """``extra_args`` are appended to the ``node`` command line; ``extra_env`` entries are set
        in the node's environment (a value of None removes the variable); with ``capture_stderr``
        the node's stderr (its JSON log lines) goes to ``stderr_path`` alone and stdout to
        ``log_path``, otherwise both go to ``log_path``."""
        self.binary = binary
        self.workdir = workdir
        self.node_id = node_id
        self.data_dir = workdir / "data"
        self.log_path = workdir / "node.log"
        self.extra_args = [str(a) for a in extra_args]
        self.extra_env = dict(extra_env or {})
        self.stderr_path: Optional[Path] = workdir / "node.stderr" if capture_stderr else None
        self.secret = secrets.token_hex(24)
        self.http_port = free_tcp_port()
        self.grpc_port = free_tcp_port()
        self.cluster_port = free_tcp_port()
        self.turn_port = free_udp_port()
        self.media_lo, self.media_hi = free_udp_range(media_ports)
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.proc: Optional[subprocess.Popen] = None
        self.exit_code: Optional[int] = None
        self.graceful: Optional[bool] = None
        self._log = None
        self._stderr = None

    @property
    def cmd(self) -> list[str]:
        return [str(self.binary)]

    @property
    def args(self) -> list[str]:
        return [
            *self.cmd, "node",
            "--node-id", self.node_id,
            "--data-dir", str(self.data_dir),
            "--http", f"127.0.0.1:{self.http_port}",
            "--grpc", f"127.0.0.1:{self.grpc_port}",
            "--cluster", f"127.0.0.1:{self.cluster_port}",
            "--turn", f"127.0.0.1:{self.turn_port}",
            "--advertise", "127.0.0.1",
            "--media-ports", f"{self.media_lo}-{self.media_hi}",
            "--api-secret", self.secret,
            *self.extra_args,
        ]

    def start(self, ready_timeout: float = 30.0) -> "Node":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        stderr = subprocess.STDOUT
        if self.stderr_path is not None:
            self._stderr = stderr = open(self.stderr_path, "ab")
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        for k, v in self.extra_env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        extra = f", env {self.extra_env}" if self.extra_env else ""
        where = f"log: {self.log_path}" + (f", stderr: {self.stderr_path}" if self.stderr_path else "")
        print(f"[e2e] starting: {' '.join(self.args)}  ({where}{extra})")
        self.proc = subprocess.Popen(
            self.args, stdout=self._log, stderr=stderr, stdin=subprocess.DEVNULL,
            cwd=self.workdir, env=env, start_new_session=True,
        )
        t0 = time.monotonic()
        deadline = t0 + ready_timeout
        last = None
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self.exit_code = rc
                raise RuntimeError(
                    f"mediamesh node exited with code {rc} before /readyz answered\n"
                    f"--- node log (tail) ---\n{self.log_tail()}")
            try:
                r = requests.get(self.base + "/readyz", timeout=2)
                if r.status_code == 200:
                    break
                last = f"HTTP {r.status_code}"
            except requests.RequestException as e:
                last = type(e).__name__
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"mediamesh node: /readyz not 200 within {ready_timeout}s (last: {last})\n"
                    f"--- node log (tail) ---\n{self.log_tail()}")
            time.sleep(0.2)
        print(f"[e2e] node ready in {time.monotonic() - t0:.2f}s at {self.base} (pid {self.proc.pid})")
        return self

    def stop(self, term_timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """Stops the node with ``sig`` (SIGTERM drains it first, SIGINT stops it at once), then
        SIGKILL after ``term_timeout``."""
        if self.proc is None:
            return self.exit_code or 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(term_timeout)
                self.graceful = True
            except subprocess.TimeoutExpired:
                self.graceful = False
                self.proc.kill()
                self.proc.wait(5)
        self.exit_code = self.proc.returncode
        for f in (self._log, self._stderr):
            if f:
                f.close()
        self._log = self._stderr = None
        assert self.proc.poll() is not None, "mediamesh node did not exit"
        print(f"[e2e] node stopped: exit code {self.exit_code}, "
              f"{signal.Signals(sig).name if self.graceful else 'SIGKILL needed' if self.graceful is False else 'already exited'}")
        return self.exit_code

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for path in (self.log_path, self.stderr_path):
            if path is None:
                continue
            try:
                data = path.read_bytes()[-64 * 1024:]
            except OSError:
                continue
            text = "\n".join(data.decode(errors="replace").splitlines()[-lines:])
            if text or path == self.log_path:
                parts.append(text if self.stderr_path is None else f"--- {path.name} ---\n{text}")
        return "\n".join(parts) if parts else "(no log)"

    def stderr_text(self) -> str:
        """Everything the node wrote to stderr so far (needs ``capture_stderr=True``)."""
        assert self.stderr_path is not None, "node started without capture_stderr"
        if self._stderr:
            self._stderr.flush()
        return self.stderr_path.read_bytes().decode("utf-8", errors="replace")

    # ---- tokens ---------------------------------------------------------------------------------
    def token(self, room: str, identity: str, *, publish=False, subscribe=False, admin=False,
              ttl: str = "1h") -> str:
        cmd = [*self.cmd, "token", "create", "--api-secret", self.secret,
               "--room", room, "--identity", identity, "--ttl", ttl]
        if publish:
            cmd.append("--publish")
        if subscribe:
            cmd.append("--subscribe")
        if admin:
            cmd.append("--admin")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=15,
                           stdin=subprocess.DEVNULL, cwd=self.workdir)
        if r.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()}")
        jwt = r.stdout.strip()
        if not re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*", jwt):
            raise RuntimeError(f"token create printed something that is not a JWT: {r.stdout!r}")
        return jwt

    # ---- HTTP API -------------------------------------------------------------------------------
    def whip_url(self, room: str) -> str:
        return f"{self.base}/whip/{room}"

    def whep_url(self, room: str) -> str:
        return f"{self.base}/whep/{room}"

    def get(self, path: str, token: Optional[str] = None, **kw) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(self.base + path, headers=headers, timeout=kw.pop("timeout", 5), **kw)

    def admin_room(self, room: str, token: str) -> requests.Response:
        return self.get(f"/admin/v1/rooms/{room}", token)

    def metric(self, name: str) -> Optional[float]:
        r = self.get("/metrics")
        r.raise_for_status()
        return parse_metric(r.text, name)

    def active_connections(self) -> Optional[float]:
        return self.metric("mediamesh_webrtc_active_connections")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def start_or_fail(n: Node) -> Node:
    """``n.start()``, failing the test (not an error trace) when the node does not become ready."""
    try:
        n.start()
    except Exception as e:
        n.stop()  # closes its log files (start() leaves them open when the node exited early)
        pytest.fail(str(e), pytrace=False)
    return n


def start_node(workdir: Path, **kw) -> Node:
    """A started Node in ``workdir`` (keyword arguments as for Node); fails the test (not an
    error trace) when the binary is missing or the node does not become ready."""
    return start_or_fail(Node(require_binary(), workdir, **kw))


def stop_node(n: Node, sig: int = signal.SIGTERM) -> None:
    """Stop ``n`` (with ``sig``, see ``Node.stop``); with MEDIAMESH_E2E_KEEP=1 print where its
    data dir and logs are kept."""
    n.stop(sig=sig)
    if os.environ.get("MEDIAMESH_E2E_KEEP") == "1":
        print(f"[e2e] kept {n.workdir}")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A fresh single node per test module; stopped (SIGTERM, then SIGKILL) at the end."""
    n = start_node(tmp_path_factory.mktemp("node"))
    yield n
    stop_node(n)


@pytest.fixture
def node_factory(tmp_path_factory):
    """``node_factory(extra_args=[...], extra_env={...}, capture_stderr=True, **Node kwargs)``
    starts a node of its own for this test; all are stopped at the end of the test (their logs
    tails are shown when the test fails)."""
    nodes: list[Node] = []

    def make(extra_args=(), extra_env: Optional[dict] = None, capture_stderr: bool = True,
             **kw) -> Node:
        nodes.append(start_node(tmp_path_factory.mktemp("node"), extra_args=extra_args,
                                extra_env=extra_env, capture_stderr=capture_stderr, **kw))
        return nodes[-1]

    make.nodes = nodes
    yield make
    for n in nodes:
        stop_node(n)


@pytest.fixture(scope="module")
def otlp_receiver():
    """An OTLP/gRPC receiver (traces, metrics, logs) on a free loopback port, one per module
    (module scope so that a module's node can be started pointing at ``otlp_receiver.endpoint``;
    call ``.clear()`` between tests).  See otlp_receiver.py."""
    from otlp_receiver import OtlpReceiver  # grpc/opentelemetry-proto only needed here

    rx = OtlpReceiver().start()
    print(f"[e2e] OTLP receiver at {rx.endpoint}")
    try:
        yield rx
    finally:
        print(f"[e2e] OTLP receiver: {rx.summary()}")
        rx.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    # the module's ``node``, other Node fixtures, and the nodes of ``node_factory``
    for name, value in getattr(item, "funcargs", {}).items():
        if isinstance(value, Node):
            rep.sections.append((f"mediamesh {name} log (tail)", value.log_tail(80)))
        elif isinstance(getattr(value, "nodes", None), list):
            for i, other in enumerate(value.nodes):
                if isinstance(other, Node):
                    rep.sections.append((f"mediamesh {name}[{i}] log (tail)", other.log_tail(80)))


# ------------------------------------------------------------------------------------------------
# pages and Chromium
# ------------------------------------------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


@pytest.fixture(scope="session")
def page_server():
    """Serves tests/e2e/pages on its own port (another origin than the node: CORS applies)."""
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(PAGES)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


class Browser:
    """A headless Chromium with the client page loaded; call window.mm.* with ``call``."""

    NAMESPACE = "mm"

    def __init__(self, driver, page_url: str):
        self.driver = driver
        self.page_url = page_url

    def open_page(self):
        self.driver.get(self.page_url)
        wait_until(lambda: self.driver.execute_script("return window.mmReady === true"), 10,
                   what="client page to load")

    def new_tab(self):
        self.driver.switch_to.new_window("tab")
        self.open_page()
        return self.driver.current_window_handle

    def call(self, fn: str, *args, timeout: float = 30.0):
        """``await window[NAMESPACE].<fn>(...args)`` in the page; raises RuntimeError with the JS
        error (its ``code`` too, when the page's error has one)."""
        self.driver.set_script_timeout(timeout)
        res = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "const [ns, fn, args] = [arguments[0], arguments[1], arguments[2]];"
            "Promise.resolve().then(() => window[ns][fn](...args))"
            "  .then((v) => done({ok: v === undefined ? null : v}),"
            "        (e) => done({err: String(e && e.stack || e), code: (e && e.code) || null}));",
            self.NAMESPACE, fn, list(args))
        if res is None or "err" in res:
            raise RuntimeError(f"{self.NAMESPACE}.{fn} failed in Chromium: {res and res['err']}\n"
                               f"--- browser console ---\n{self.console()}")
        return res["ok"]

    def console(self) -> str:
        try:
            return "\n".join(f"{e['level']} {e['message']}" for e in self.driver.get_log("browser"))
        except Exception as e:  # not all drivers expose logs
            return f"(no console: {e})"


def _start_chromium(user_data_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(f"{CHROMIUM} / {CHROMEDRIVER} missing: run tests/e2e/setup.sh", pytrace=False)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in CHROMIUM_FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={user_data_dir}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER)
    return webdriver.Chrome(service=service, options=opts)


@pytest.fixture(scope="module")
def browser(page_server, tmp_path_factory):
    """A fresh headless Chromium (fresh --user-data-dir) per module, client page loaded."""
    udd = tmp_path_factory.mktemp("chromium-profile")
    t0 = time.monotonic()
    driver = _start_chromium(udd)
    b = Browser(driver, f"{page_server}/client.html")
    try:
        b.open_page()
        print(f"[e2e] chromium up in {time.monotonic() - t0:.1f}s: {driver.capabilities.get('browserVersion')}")
        yield b
    finally:
        driver.quit()
        shutil.rmtree(udd, ignore_errors=True)


def pytest_report_header(config):
    b = node_binary()
    return [f"mediamesh binary: {b} ({'present' if b.exists() else 'MISSING'})"]
