"""The node's Prometheus surface, checked with the real Prometheus tools during a live session.

One aiortc WHIP publisher + one WHEP viewer stay live (in a background thread) for the whole
module while:
  * ``GET /metrics`` passes ``promtool check metrics`` (exit 0, nothing printed);
  * every metric family follows the Prometheus naming rules (``_total`` on counters, base-unit
    suffixes ``_seconds`` / ``_bytes``, well-formed histograms) and no label carries a room /
    session / identity (label names and values both checked);
  * a real ``prometheus`` server (own free loopback port, temp config and TSDB, 1 s scrapes)
    scrapes the node: ``up == 1`` and ``sum(mediamesh_rtp_packets_forwarded_total)`` /
    ``sum(rate(...))`` become > 0;
  * the Grafana dashboard ``deploy/grafana/mediamesh.json`` is well formed, its PromQL parses
    (``promtool check rules``) and every metric it queries is exported by the node.

Two node-less tests prove the checkers can fail (bad exposition, bad PromQL).
Needs ``prometheus`` + ``promtool`` (Debian package ``prometheus``; tests/e2e/setup.sh).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest
import requests

import whipwhep as ww
from conftest import REPO, free_tcp_port, parse_metric, wait_until

pytestmark = pytest.mark.timeout(180)

DASHBOARD = REPO / "deploy" / "grafana" / "mediamesh.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
JOB = "mediamesh-e2e"

# unique per run, so that finding them in /metrics can only mean they leaked into labels
_TAG = secrets.token_hex(4)
ROOM = f"e2e-prom-{_TAG}"
PUB_ID = f"prom-pub-{_TAG}"
VIEW_ID = f"prom-viewer-{_TAG}"


def need(tool: str) -> str:
    if not (os.path.isfile(tool) and os.access(tool, os.X_OK)):
        pytest.fail(f"{tool} missing: run tests/e2e/setup.sh (Debian package prometheus)",
                    pytrace=False)
    return tool


# ================================================================================================
# exposition-format checker (pure functions; proven able to fail by a node-less test below)
# ================================================================================================
ALLOWED_PREFIXES = ("mediamesh_", "process_")
# label names that would put a room / session / person into a series (unbounded cardinality)
FORBIDDEN_LABELS = {
    "room", "room_id", "room_name", "session", "session_id", "sid", "viewer", "viewer_id",
    "identity", "participant", "participant_id", "publisher", "publisher_id", "subscriber",
    "subscriber_id", "user", "user_id", "client", "client_id", "peer", "peer_id", "track",
    "track_id", "ssrc", "token", "trace_id", "span_id", "connection", "connection_id", "ip",
    "addr", "remote_addr", "url", "path",
}
# units that are not Prometheus base units (use _seconds, _bytes, ratios)
NON_BASE_UNITS = {
    "ms", "msec", "millis", "milliseconds", "us", "usec", "micros", "microseconds", "ns", "nanos",
    "nanoseconds", "sec", "secs", "minutes", "mins", "hours", "days", "kb", "kib", "mb", "mib", "gb",
    "gib", "kilobytes", "megabytes", "gigabytes", "percent", "pct",
}
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+(-?\d+))?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
_ID_LIKE = [
    (re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"), "a UUID"),
    (re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{16,}(?![0-9a-fA-F])"), "a long hex id"),
    (re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), "a JWT"),
]
_TIME_WORDS = re.compile(r"\b(latency|duration|seconds?|round[- ]trip|rtt|delay|time to)\b", re.I)


def parse_labels(s: str) -> dict:
    out, pos = {}, 0
    s = s.strip()
    while pos < len(s):
        m = _LABEL.match(s, pos)
        if not m:
            raise ValueError(f"bad label set {{{s}}} at {pos}")
        out[m.group(1)] = m.group(2).encode().decode("unicode_escape")
        pos = m.end()
    return out


def parse_exposition(text: str):
    """-> (families, samples): families {name: {"type", "help"}}, samples [(name, labels, value)]."""
    families: dict[str, dict] = {}
    samples: list[tuple[str, dict, float]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                fam = families.setdefault(parts[2], {"type": None, "help": None})
                fam["type" if parts[1] == "TYPE" else "help"] = parts[3] if len(parts) > 3 else ""
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"unparsable sample line: {raw!r}")
        samples.append((m.group(1), parse_labels(m.group(2) or ""), float(m.group(3))))
    return families, samples


def family_of(sample_name: str, families: dict) -> Optional[str]:
    if sample_name in families:
        return sample_name
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in families:
            return sample_name[: -len(suffix)]
    return None


def lint_exposition(text: str, forbidden_values=(), max_series: int = 500) -> list[str]:
    """Naming / unit / label / histogram problems in a Prometheus text exposition ([] = clean).
    ``forbidden_values``: strings (room names, identities) that must not occur in any label."""
    problems: list[str] = []
    try:
        families, samples = parse_exposition(text)
    except ValueError as e:
        return [str(e)]
    series: dict[str, set] = {}
    seen = set()
    hist: dict[tuple, dict] = {}
    for name, labels, value in samples:
        fam = family_of(name, families)
        if fam is None or families[fam]["type"] is None:
            problems.append(f"{name}: sample without a # TYPE line")
            continue
        key = (name, tuple(sorted(labels.items())))
        if key in seen:
            problems.append(f"{name}{labels}: duplicate series")
        seen.add(key)
        for ln, lv in labels.items():
            if not _LABEL_NAME.match(ln) or ln.startswith("__"):
                problems.append(f"{fam}: bad label name {ln!r}")
            if ln.lower() in FORBIDDEN_LABELS:
                problems.append(f"{fam}: label {ln!r} identifies a room/session/participant "
                                f"(unbounded cardinality): {ln}={lv!r}")
            for fv in forbidden_values:
                if fv and fv in lv:
                    problems.append(f"{fam}: label {ln}={lv!r} contains the room/identity {fv!r}")
            for pat, what in _ID_LIKE:
                if pat.search(lv):
                    problems.append(f"{fam}: label {ln}={lv!r} looks like {what}")
            if len(lv) > 80:
                problems.append(f"{fam}: label {ln} value longer than 80 chars: {lv[:40]!r}...")
        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        series.setdefault(fam, set()).add(rest)
        if families[fam]["type"] == "histogram":
            h = hist.setdefault((fam, rest), {"buckets": [], "sum": None, "count": None})
            if name == fam + "_bucket":
                if "le" not in labels:
                    problems.append(f"{fam}_bucket without an le label")
                else:
                    h["buckets"].append((float(labels["le"]), value))
            elif name == fam + "_sum":
                h["sum"] = value
            elif name == fam + "_count":
                h["count"] = value
            else:
                problems.append(f"{name}: unexpected sample in histogram {fam}")
    for fam, info in sorted(families.items()):
        typ, help_ = info["type"], info["help"] or ""
        if typ is None:
            problems.append(f"{fam}: # HELP without # TYPE")
            continue
        if not help_.strip():
            problems.append(f"{fam}: no # HELP text")
        if not _NAME.match(fam):
            problems.append(f"{fam}: not a lower_snake_case metric name")
        if not fam.startswith(ALLOWED_PREFIXES):
            problems.append(f"{fam}: not in the mediamesh_ / process_ namespaces")
        if typ == "counter" and not fam.endswith("_total"):
            problems.append(f"{fam}: counter without the _total suffix")
        if typ != "counter" and fam.endswith("_total"):
            problems.append(f"{fam}: {typ} with a _total suffix (only counters end in _total)")
        base = fam[: -len("_total")] if fam.endswith("_total") else fam
        words = base.split("_")
        for w in words:
            if w in NON_BASE_UNITS:
                problems.append(f"{fam}: non-base unit {w!r} (use seconds / bytes / a 0..1 ratio)")
        for unit in ("seconds", "bytes"):
            if unit in words and not base.endswith("_" + unit):
                problems.append(f"{fam}: unit {unit!r} must be the suffix (…_{unit}"
                                f"{'_total' if typ == 'counter' else ''})")
        if re.search(r"\bbytes\b", help_, re.I) and not base.endswith("_bytes"):
            problems.append(f"{fam}: HELP says bytes but the name does not end in _bytes")
        if re.search(r"\bin seconds\b", help_, re.I) and not base.endswith("_seconds"):
            problems.append(f"{fam}: HELP says seconds but the name does not end in _seconds")
        if typ in ("histogram", "summary") and _TIME_WORDS.search(help_) and not base.endswith("_seconds"):
            problems.append(f"{fam}: a time {typ} must be in seconds (name ending _seconds)")
        if fam in series and len(series[fam]) > max_series:
            problems.append(f"{fam}: {len(series[fam])} series (> {max_series}): unbounded labels?")
    for (fam, rest), h in sorted(hist.items()):
        where = f"{fam}{dict(rest)}"
        b = sorted(h["buckets"])
        if not b or not math.isinf(b[-1][0]):
            problems.append(f"{where}: no le=\"+Inf\" bucket")
        if any(b[i][1] > b[i + 1][1] for i in range(len(b) - 1)):
            problems.append(f"{where}: bucket counts are not cumulative: {b}")
        if h["count"] is None or h["sum"] is None:
            problems.append(f"{where}: missing _count or _sum")
        elif b and math.isinf(b[-1][0]) and b[-1][1] != h["count"]:
            problems.append(f"{where}: +Inf bucket {b[-1][1]} != _count {h['count']}")
    return problems


# ================================================================================================
# a live session for the whole module (publisher + viewer in a background event loop)
# ================================================================================================
class LiveSession:
    """aiortc WHIP publisher + WHEP viewer kept live in a background event loop until ``stop()``."""

    def __init__(self, node, max_seconds: float = 170.0):
        self.node = node
        self.pub_token = node.token(ROOM, PUB_ID, publish=True)
        self.view_token = node.token(ROOM, VIEW_ID, subscribe=True)
        self.max_seconds = max_seconds
        self.bg: Optional[ww.BackgroundLoop] = None
        self.ready = False
        self.viewer: Optional[ww.Session] = None
        self.publisher: Optional[ww.Session] = None
        self.close_statuses: list = []

    def start(self, timeout: float = 60.0) -> "LiveSession":
        self.bg = ww.BackgroundLoop("live-session", max_seconds=self.max_seconds)
        try:
            self.bg.run(self._open(), timeout)
        except BaseException as e:
            self.stop()
            if isinstance(e, ww.BackgroundLoop.Deadline):
                raise TimeoutError(f"live session not up within {timeout}s") from e
            if isinstance(e, Exception):
                raise RuntimeError(f"live session failed to start: {e!r}") from e
            raise
        self.ready = True
        return self

    async def _open(self) -> None:
        self.publisher = self.bg.adopt(await ww.publish(self.node.whip_url(ROOM), self.pub_token))
        self.viewer = self.bg.adopt(await ww.play(self.node.whep_url(ROOM), self.view_token))
        await self.viewer.wait_frames(video=30, audio=5, timeout=30)

    @property
    def error(self) -> Optional[BaseException]:
        return self.bg.error if self.bg else None

    def frames(self) -> tuple[int, int]:
        c = self.viewer.counter if self.viewer else None
        return (c.video, c.audio) if c else (0, 0)

    def alive(self) -> bool:
        return self.ready and self.bg.alive()

    def stop(self) -> None:
        if self.bg:
            self.close_statuses = list(self.bg.close())


@pytest.fixture(scope="module")
def live(node):
    t0 = time.monotonic()
    s = LiveSession(node).start()
    print(f"[e2e] live session in room {ROOM}: {s.frames()} frames after {time.monotonic() - t0:.1f}s")
    try:
        yield s
    finally:
        s.stop()
        print(f"[e2e] live session stopped: viewer got {s.frames()} (video, audio) frames, "
              f"DELETE statuses {s.close_statuses}")


def scrape(node) -> requests.Response:
    r = node.get("/metrics")
    assert r.status_code == 200, f"GET /metrics -> {r.status_code}: {r.text[:300]}"
    return r


def live_scrape(node, live) -> str:
    """/metrics once media is flowing (forwarded packets > 0), the session still live."""
    def flowing() -> Optional[str]:
        text = scrape(node).text
        return text if (parse_metric(text, "mediamesh_rtp_packets_forwarded_total") or 0) > 0 else None

    text = wait_until(flowing, 15, what="mediamesh_rtp_packets_forwarded_total > 0 on /metrics")
    assert live.alive(), f"live session ended early: {live.error!r}"
    return text


# ================================================================================================
# a real Prometheus server
# ================================================================================================
class PromServer:
    def __init__(self, workdir: Path, target: str, job: str = JOB, labels: Optional[dict] = None):
        self.workdir = workdir
        self.port = free_tcp_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        # YAML is a superset of JSON: no yaml library needed
        self.config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{
                "job_name": job, "scrape_interval": "1s", "scrape_timeout": "1s",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target], "labels": labels or {}}],
            }],
        }, indent=2))
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30.0) -> "PromServer":
        args = [need(PROMETHEUS), f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h", "--log.level=info"]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir,
                                     start_new_session=True)
        t0 = time.monotonic()

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            return requests.get(self.base + "/api/v1/query", params={"query": "1"},
                                timeout=2).status_code == 200

        try:
            wait_until(ready, timeout, what=f"prometheus query API at {self.base}")
        except RuntimeError as e:
            raise RuntimeError(str(e)) from None
        print(f"[e2e] prometheus ready in {time.monotonic() - t0:.1f}s at {self.base} (pid {self.proc.pid})")
        return self

    def query(self, expr: str) -> list:
        r = requests.get(self.base + "/api/v1/query", params={"query": expr}, timeout=5)
        body = r.json()
        assert r.status_code == 200 and body.get("status") == "success", f"{expr}: {r.status_code} {body}"
        return body["data"]["result"]

    def scalar(self, expr: str) -> Optional[float]:
        """The single value of an instant vector query (None when the vector is empty)."""
        res = self.query(expr)
        return float(res[0]["value"][1]) if res else None

    def targets(self) -> list:
        return requests.get(self.base + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None


# ================================================================================================
# Grafana dashboard helpers
# ================================================================================================
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "offset", "and", "or", "unless", "inf", "nan", "atan2", "start", "end"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# a Grafana template query: label_values(<selector>, <label>)
_LABEL_VALUES = re.compile(r"\s*label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*")


def _selector_of_label_values(expr: str) -> str:
    """``label_values(<selector>, <label>)`` -> ``<selector>``; any other expression unchanged."""
    lv = _LABEL_VALUES.fullmatch(expr)
    return lv.group(1) if lv else expr


def expr_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (functions, keywords, labels excluded)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', _selector_of_label_values(expr))  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)                    # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                   # range / subquery durations
    e = _GROUPING.sub(" ", e)                           # by (...) / on (...) label lists
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        tok = m.group(0)
        before = e[m.start() - 1] if m.start() else " "
        if before.isdigit() or before in ".$":           # 1e-9, $var
            continue
        if e[m.end():].lstrip().startswith("("):        # function or aggregation
            continue
        if tok.lower() in PROMQL_KEYWORDS:
            continue
        names.add(tok)
    return names


def dashboard_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every query template variable; ``where`` names
    the row too (``Overview / panel 2 'Rooms' A``)."""
    out = []
    row = ""
    for p in dashboard_panels(dash):
        if p.get("type") == "row":
            row = p.get("title", "")
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((f"{row} / panel {p.get('id')} {p.get('title')!r} {t.get('refId')}", t["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            if q:
                out.append((f"variable ${v['name']}", q))
    return out


def family_name(metric: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return metric


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's template variables so that the expression is plain PromQL
    (a ``label_values(<selector>, <label>)`` variable query becomes its selector)."""
    expr = _selector_of_label_values(expr)
    return (expr.replace("$__rate_interval", "1m").replace("${__rate_interval}", "1m")
            .replace("$__interval", "1m").replace("$__range", "1h")
            .replace('"$instance"', '".*"').replace("$instance", ".*"))


def promql_problems(exprs: list[tuple[str, str]], tmp_path: Path) -> list[str]:
    """Parse every expression with ``promtool check rules`` (one recording rule each)."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": grafana_to_promql(e)} for i, (_, e) in enumerate(exprs)
    ]}]}
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(json.dumps(rules, indent=1))
    r = subprocess.run([need(PROMTOOL), "check", "rules", str(f)], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    if r.returncode == 0:
        return []
    out = (r.stdout + r.stderr).strip()
    # map the failing "dashboard:expr_N" rules back to their panels
    return [f"promtool check rules rc={r.returncode}: {out}"] + [
        f"  {where}: {e}" for i, (where, e) in enumerate(exprs) if f'"dashboard:expr_{i}"' in out]


def load_dashboard() -> dict:
    assert DASHBOARD.is_file(), f"{DASHBOARD} missing"
    return json.loads(DASHBOARD.read_text())


# ================================================================================================
# tests without a node: the checkers themselves
# ================================================================================================
BAD_EXPOSITION = """\
# HELP mediamesh_requests Requests handled
# TYPE mediamesh_requests counter
mediamesh_requests 3
# HELP mediamesh_latency_ms Request latency in milliseconds
# TYPE mediamesh_latency_ms histogram
mediamesh_latency_ms_bucket{le="10"} 2
mediamesh_latency_ms_bucket{le="100"} 1
mediamesh_latency_ms_sum 30
mediamesh_latency_ms_count 2
# HELP mediamesh_sent_total Payload bytes sent
# TYPE mediamesh_sent_total counter
mediamesh_sent_total 10
# HELP mediamesh_rooms_total Rooms hosted
# TYPE mediamesh_rooms_total gauge
mediamesh_rooms_total 1
# HELP mediamesh_seconds_uptime Uptime
# TYPE mediamesh_seconds_uptime gauge
mediamesh_seconds_uptime 1
# HELP mediamesh_viewer_packets_total Packets per viewer
# TYPE mediamesh_viewer_packets_total counter
mediamesh_viewer_packets_total{room="lobby",viewer="9f1c2d3e4a5b6c7d8e9f"} 4
mediamesh_viewer_packets_total{route="/whep/e2e-secret-room/abc"} 4
mediamesh_viewer_packets_total{kind="c0ffee00-1234-4abc-8def-0123456789ab"} 1
# HELP tokio_tasks Tasks
# TYPE tokio_tasks gauge
tokio_tasks 3
"""

GOOD_EXPOSITION = """\
# HELP mediamesh_http_request_duration_seconds HTTP request latency
# TYPE mediamesh_http_request_duration_seconds histogram
mediamesh_http_request_duration_seconds_bucket{route="/whep/{room}",method="POST",status="201",le="0.01"} 1
mediamesh_http_request_duration_seconds_bucket{route="/whep/{room}",method="POST",status="201",le="0.1"} 2
mediamesh_http_request_duration_seconds_bucket{route="/whep/{room}",method="POST",status="201",le="+Inf"} 2
mediamesh_http_request_duration_seconds_sum{route="/whep/{room}",method="POST",status="201"} 0.05
mediamesh_http_request_duration_seconds_count{route="/whep/{room}",method="POST",status="201"} 2
# HELP mediamesh_rtp_forwarded_bytes_total RTP payload bytes forwarded
# TYPE mediamesh_rtp_forwarded_bytes_total counter
mediamesh_rtp_forwarded_bytes_total 10
# HELP mediamesh_participants Sessions by role
# TYPE mediamesh_participants gauge
mediamesh_participants{role="publisher"} 1
# HELP process_resident_memory_bytes Resident memory size in bytes
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1e+07
"""


def test_exposition_checker_catches_bad_metrics():
    """The naming/label checker used on the live /metrics below must be able to fail."""
    assert lint_exposition(GOOD_EXPOSITION, forbidden_values=["e2e-secret-room"]) == []
    problems = lint_exposition(BAD_EXPOSITION, forbidden_values=["e2e-secret-room"])
    text = "\n".join(problems)
    print(text)
    expected = [
        "mediamesh_requests: counter without the _total suffix",
        "mediamesh_latency_ms: non-base unit 'ms'",
        "mediamesh_latency_ms: a time histogram must be in seconds",
        "mediamesh_latency_ms{}: no le=\"+Inf\" bucket",
        "mediamesh_latency_ms{}: bucket counts are not cumulative",
        "mediamesh_sent_total: HELP says bytes but the name does not end in _bytes",
        "mediamesh_rooms_total: gauge with a _total suffix",
        "mediamesh_seconds_uptime: unit 'seconds' must be the suffix",
        "mediamesh_viewer_packets_total: label 'room' identifies",
        "mediamesh_viewer_packets_total: label 'viewer' identifies",
        "label viewer='9f1c2d3e4a5b6c7d8e9f' looks like a long hex id",
        "contains the room/identity 'e2e-secret-room'",
        "looks like a UUID",
        "tokio_tasks: not in the mediamesh_ / process_ namespaces",
    ]
    missing = [e for e in expected if e not in text]
    assert not missing, f"checker missed: {missing}\nit reported:\n{text}"
    # promtool agrees that the bad exposition is bad (lint exit 3)
    r = subprocess.run([need(PROMTOOL), "check", "metrics"], input=BAD_EXPOSITION,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 3 and "_total" in r.stderr, (r.returncode, r.stdout, r.stderr)


def test_promql_checks_catch_bad_exprs(tmp_path):
    assert expr_metric_names(
        'histogram_quantile(0.99, sum by (le, route) (rate(mediamesh_http_request_duration_seconds_bucket'
        '{instance=~"$instance", status=~"5.."}[$__rate_interval])))') == {
            "mediamesh_http_request_duration_seconds_bucket"}
    assert expr_metric_names("sum(rate(a_total[1m])) / clamp_min(sum(b) + c offset 5m, 1e-9) > 0") == {
        "a_total", "b", "c"}
    assert expr_metric_names("label_values(mediamesh_rooms, instance)") == {"mediamesh_rooms"}
    assert expr_metric_names("max by (instance) (x) * on (instance) group_left (role) y") == {"x", "y"}
    good = [("ok", 'sum(rate(mediamesh_rooms{instance=~"$instance"}[$__rate_interval]))')]
    assert promql_problems(good, tmp_path) == []
    bad = good + [("broken", "sum(rate(mediamesh_rooms[1m])")]
    problems = promql_problems(bad, tmp_path)
    print("\n".join(problems))
    assert problems and "broken" in "\n".join(problems), problems


def test_grafana_dashboard_valid(tmp_path):
    """deploy/grafana/mediamesh.json: importable structure, $instance everywhere, PromQL parses."""
    dash = load_dashboard()
    assert 36 <= dash.get("schemaVersion", 0) <= 41, dash.get("schemaVersion")
    assert dash.get("uid") and dash.get("title"), "uid/title"
    assert any(i.get("name") == "DS_PROMETHEUS" and i.get("pluginId") == "prometheus"
               for i in dash.get("__inputs", [])), "no DS_PROMETHEUS datasource input"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "instance" in variables, variables.keys()
    panels = dashboard_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Overview", "Media", "Edge", "Cluster", "Process"], rows
    cells = set()
    problems = []
    for p in panels:
        g = p["gridPos"]
        if g["x"] < 0 or g["x"] + g["w"] > 24 or g["w"] <= 0 or g["h"] <= 0:
            problems.append(f"panel {p['id']} {p['title']!r}: gridPos out of the 24 columns: {g}")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    problems.append(f"panel {p['id']} {p['title']!r} overlaps another at {(x, y)}")
                    break
                cells.add((x, y))
        if p["type"] == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            problems.append(f"panel {p['id']} {p['title']!r}: datasource {p.get('datasource')}")
        if not p.get("targets"):
            problems.append(f"panel {p['id']} {p['title']!r}: no targets")
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
                problems.append(f"panel {p['id']} {t.get('refId')}: target datasource {t.get('datasource')}")
            if 'instance=~"$instance"' not in t.get("expr", ""):
                problems.append(f"panel {p['id']} {p['title']!r}: expr ignores $instance: {t.get('expr')}")
    exprs = dashboard_exprs(dash)
    problems += promql_problems(exprs, tmp_path)
    assert not problems, "\n".join(problems)
    names = sorted({family_name(n) for _, e in exprs for n in expr_metric_names(e)})
    print(f"{len(panels)} panels, {len(exprs)} queries over {len(names)} metric families")


# ================================================================================================
# tests against the node during a live session
# ================================================================================================
def test_metrics_pass_promtool_lint(node, live):
    text = live_scrape(node, live)
    ctype = scrape(node).headers.get("Content-Type", "")
    assert ctype.startswith("text/plain"), f"/metrics Content-Type {ctype!r}"
    t0 = time.monotonic()
    r = subprocess.run([need(PROMTOOL), "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    print(f"promtool check metrics: rc {r.returncode} in {time.monotonic() - t0:.2f}s, "
          f"{len(text.splitlines())} lines scraped, viewer frames {live.frames()}")
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (
        f"promtool check metrics rc={r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")


def test_metric_names_units_and_labels(node, live):
    text = live_scrape(node, live)
    families, samples = parse_exposition(text)
    problems = lint_exposition(text, forbidden_values=[ROOM, PUB_ID, VIEW_ID, _TAG])
    # the ids of the live sessions (the Location paths) must not show up anywhere either
    for s in (live.publisher, live.viewer):
        sid = s.location.rstrip("/").rsplit("/", 1)[-1] if s and s.location else None
        if sid and len(sid) >= 6 and sid in text:
            problems.append(f"the live session id {sid!r} appears in /metrics")
    label_names = sorted({k for _, labels, _ in samples for k in labels})
    print(f"{len(families)} families, {len(samples)} samples, label names {label_names}")
    assert not problems, "\n".join(problems)


def test_prometheus_server_scrapes_node(node, live, tmp_path):
    live_scrape(node, live)  # media is flowing
    prom = PromServer(tmp_path, f"127.0.0.1:{node.http_port}", labels={"node": node.node_id})
    t0 = time.monotonic()
    try:
        prom.start()
        sel = f'{{job="{JOB}"}}'
        # wait_until returns the first truthy value: not None (empty vector) and not 0
        up = wait_until(lambda: prom.scalar(f"up{sel}"), 30, what=f"up{sel} == 1")
        assert up == 1.0, up
        total = wait_until(lambda: prom.scalar(f"sum(mediamesh_rtp_packets_forwarded_total{sel})"),
                           30, what="sum(mediamesh_rtp_packets_forwarded_total) > 0 in prometheus")
        rate = wait_until(lambda: prom.scalar(f"sum(rate(mediamesh_rtp_packets_forwarded_total{sel}[5s]))"),
                          30, what="sum(rate(mediamesh_rtp_packets_forwarded_total[5s])) > 0 in prometheus")
        assert total > 0 and rate > 0
        (target,) = [t for t in prom.targets() if t["labels"].get("job") == JOB]
        assert target["health"] == "up" and not target["lastError"], target
        series = prom.scalar(f"scrape_samples_scraped{sel}")
        conns = prom.scalar(f"sum(mediamesh_webrtc_active_connections{sel})")
        print(f"prometheus: up=1, forwarded total {total:.0f}, rate {rate:.1f} pkt/s, "
              f"{series:.0f} samples/scrape, active connections {conns}, "
              f"{time.monotonic() - t0:.1f}s; viewer frames {live.frames()}")
        assert conns == 2, f"active connections {conns} (publisher + viewer expected)"

        # every dashboard query evaluates on this Prometheus; the Overview ones return data now
        empty, overview_empty = [], []
        for where, expr in dashboard_exprs(load_dashboard()):
            res = prom.query(grafana_to_promql(expr))
            if not res:
                empty.append(where)
                if "Overview" in where or where.startswith("variable"):
                    overview_empty.append(f"{where}: {expr}")
        print(f"dashboard queries without data now (no traffic of that kind yet): {empty}")
        assert not overview_empty, "Overview queries empty during a live session:\n" + "\n".join(overview_empty)
        assert live.alive(), f"live session ended early: {live.error!r}"
    except Exception:
        print(f"--- prometheus log (tail) ---\n{prom.log_tail()}")
        raise
    finally:
        prom.stop()
    assert prom.proc.returncode is not None


def test_dashboard_metrics_are_exported(node, live):
    """Every metric the Grafana dashboard queries is on the node's /metrics."""
    text = live_scrape(node, live)
    families, _ = parse_exposition(text)
    exported = set(families)
    wanted: dict[str, list[str]] = {}
    for where, expr in dashboard_exprs(load_dashboard()):
        for n in expr_metric_names(expr):
            # X_bucket / X_sum / X_count belong to histogram X (unless X_count itself is exported)
            fam = n if n in exported and family_name(n) not in exported else family_name(n)
            wanted.setdefault(fam, []).append(where)
    missing = sorted(set(wanted) - exported)
    print(f"dashboard queries {len(wanted)} metric families; exported {len(exported)}; "
          f"missing {len(missing)}: {missing}")
    assert not missing, ("metrics queried by deploy/grafana/mediamesh.json but not on /metrics:\n" +
                         "\n".join(f"  {m}  (used by {', '.join(sorted(set(wanted[m])))[:200]})"
                                   for m in missing))
