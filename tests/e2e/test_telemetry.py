"""The node's telemetry seen from outside: OTLP spans and metrics in a real OTLP/gRPC receiver
(otlp_receiver.py) and the JSON log lines on the node's stderr.

1. a WHIP publish to a new room is one trace: the ``POST /whip/{room}`` server span (root) with
   ``room.claim`` -> ``store.propose`` -> ``store.commit`` and ``room.publish`` under it, every
   parent link inside the trace;
2. a caller's W3C ``traceparent`` (with a ``tracestate``) is continued: same trace id, the caller's
   span as parent;
3. at ``--trace-sample-floor 0`` only traces with an error are exported: the refused requests'
   spans arrive (status ERROR), none of the healthy ``GET /healthz`` ones (checked after the
   node's shutdown flush);
4. all metric families are pushed over OTLP at ``OTEL_METRIC_EXPORT_INTERVAL``;
5. the ``request refused`` log line carries the caller's trace id and the server span's id;
6. personal data (client IP, identities, a Hangul name, a phone number, an e-mail address) sent
   from client address 127.0.0.77 over WHIP, WHEP, a refused request and WebSocket signaling
   never reaches the logs (at debug level) nor the exported spans; the masked forms do.

Tests 1, 2, 4 and 5 share one node (floor 1, metrics every 500 ms, stderr captured) and the
module's receiver; 3 and 6 start nodes of their own (``node_factory``) with their own receiver.
Every node exports its span batches every 200 ms (``OTEL_BSP_SCHEDULE_DELAY``; the SDK's default
5 s would be most of each test's time).
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import time
import types
import urllib.parse
from typing import Optional

import pytest
import requests
from requests.adapters import HTTPAdapter

import whipwhep as ww
from conftest import start_node, stop_node, wait_until
from otlp_receiver import STATUS_ERROR, OtlpReceiver

pytestmark = pytest.mark.timeout(120)

SERVER = 2  # SpanKind SERVER
HEX16 = re.compile(r"^[0-9a-f]{16}$")
HEX32 = re.compile(r"^[0-9a-f]{32}$")


def traceparent() -> tuple[str, str, str]:
    """(header, trace id, span id) of a fresh sampled W3C trace context."""
    t, s = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{t}-{s}-01", t, s


def fresh_room(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def describe(spans) -> str:
    return "\n  ".join(f"{s}  {s.attributes}" for s in spans) or "(none)"


# the node's environment for every test here: no inherited RUST_LOG / OTLP endpoint, span batches
# exported every 200 ms instead of the SDK's 5 s (the tests wait for them)
NODE_ENV = {"RUST_LOG": None, "OTEL_EXPORTER_OTLP_ENDPOINT": None, "OTEL_BSP_SCHEDULE_DELAY": "200"}


def otlp_args(rx, floor: int) -> list[str]:
    return ["--otlp-endpoint", rx.endpoint, "--trace-sample-floor", str(floor)]


@pytest.fixture
def own_receiver():
    """A receiver of the test's own, for a ``node_factory`` node (request it before
    ``node_factory``: the receiver then outlives the node and gets its shutdown flush)."""
    with OtlpReceiver() as rx:
        yield rx


async def publish_and_view(node, room: str, pub_token: str, view_token: str) -> dict:
    """WHIP-publish into ``room``, WHEP-view it until 5 video frames decoded, DELETE both;
    -> the DELETE statuses {"whep delete": .., "whip delete": ..}."""
    statuses = {}
    pub = await ww.publish(node.whip_url(room), pub_token)
    try:
        viewer = await ww.play(node.whep_url(room), view_token)
        try:
            await viewer.wait_frames(video=5, timeout=15)
        finally:
            statuses["whep delete"] = await viewer.close()
    finally:
        statuses["whip delete"] = await pub.close()
    return statuses


# ------------------------------------------------------------------------------------------------
# the shared node: OTLP to the module's receiver, every trace exported, metrics every 500 ms
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tele_node(otlp_receiver, tmp_path_factory):
    n = start_node(tmp_path_factory.mktemp("node"), extra_args=otlp_args(otlp_receiver, 1),
                   extra_env={**NODE_ENV, "OTEL_METRIC_EXPORT_INTERVAL": "500"},
                   capture_stderr=True)
    yield n
    stop_node(n)


# ------------------------------------------------------------------------------------------------
# 1. one trace per WHIP publish
# ------------------------------------------------------------------------------------------------
WHIP_SPANS = ("POST /whip/{room}", "room.claim", "store.propose", "store.commit", "room.publish")


def _publish_trace(room: str):
    """-> predicate over spans: the trace holding ``room.publish`` of ``room`` once it has every
    span of WHIP_SPANS and every parent of its spans."""
    def pred(spans):
        mine = {s.trace_id for s in spans
                if s.name == "room.publish" and s.attributes.get("room") == room}
        for tid in mine:
            trace = [s for s in spans if s.trace_id == tid]
            ids = {s.span_id for s in trace}
            if (all(any(s.name == n for s in trace) for n in WHIP_SPANS)
                    and all(not s.parent_span_id or s.parent_span_id in ids for s in trace)):
                return trace
        return None
    return pred


def test_whip_publish_is_one_trace(tele_node, otlp_receiver):
    node, rx = tele_node, otlp_receiver
    room = fresh_room("tele-trace")
    pub_token = node.token(room, "trace-pub", publish=True)
    view_token = node.token(room, "trace-viewer", subscribe=True)

    t0 = time.monotonic()
    ww.run(publish_and_view(node, room, pub_token, view_token), timeout=60)
    t_media = time.monotonic() - t0
    try:
        trace = rx.wait_for(_publish_trace(room), timeout=15, what=f"the WHIP publish trace of {room}")
    except TimeoutError:
        partial = [s for s in rx.spans()
                   if s.trace_id in {x.trace_id for x in rx.spans() if x.attributes.get("room") == room}]
        raise AssertionError(f"no complete publish trace for {room} within 15 s; spans of the "
                             f"room's traces:\n  {describe(partial)}\nreceiver: {rx.summary()}")
    print(f"publish + viewer {t_media:.1f}s; trace complete {time.monotonic() - t0:.1f}s after "
          f"start:\n  {describe(trace)}")

    by_id = {s.span_id: s for s in trace}
    named = {n: [s for s in trace if s.name == n] for n in WHIP_SPANS}
    problems = []
    for n in ("POST /whip/{room}", "room.claim", "room.publish"):
        if len(named[n]) != 1:
            problems.append(f"{len(named[n])} spans {n!r} in the trace (want exactly 1)")
    http = named["POST /whip/{room}"][0]
    roots = [s for s in trace if not s.parent_span_id]
    if roots != [http]:
        problems.append(f"roots of the trace: {[str(s) for s in roots]} (want only the HTTP span)")
    dangling = [s for s in trace if s.parent_span_id and s.parent_span_id not in by_id]
    if dangling:
        problems.append(f"spans whose parent is not in the trace: {[str(s) for s in dangling]}")
    if len(by_id) != len(trace):
        problems.append("duplicate span ids in the trace")

    def parent_name(s) -> Optional[str]:
        p = by_id.get(s.parent_span_id)
        return p.name if p else None

    want_parent = {"room.claim": "POST /whip/{room}", "room.publish": "POST /whip/{room}",
                   "store.propose": "room.claim", "store.commit": "store.propose"}
    for child, parent in want_parent.items():
        for s in named[child]:
            if parent_name(s) != parent:
                problems.append(f"{child} {s.span_id}: parent {parent_name(s)!r}, want {parent!r}")
    if (http.kind, http.attributes.get("http.request.method"), http.attributes.get("http.route")) != (
            SERVER, "POST", "/whip/{room}"):
        problems.append(f"HTTP span kind/method/route: {http.kind} {http.attributes}")
    if http.attributes.get("client.address") != "127.0.0.0":
        problems.append(f"client.address {http.attributes.get('client.address')!r}, want the /24 127.0.0.0")
    if named["room.publish"] and (named["room.publish"][0].attributes.get("room") != room
                                  or "epoch" not in named["room.publish"][0].attributes):
        problems.append(f"room.publish attributes {named['room.publish'][0].attributes}")
    for s in named["store.commit"]:
        idx = s.attributes.get("raft.index")
        if idx is None or not str(idx).isdigit() or int(idx) <= 0:
            problems.append(f"store.commit raft.index {idx!r}")
    for s in trace:
        if not (s.start_ns and s.end_ns >= s.start_ns):
            problems.append(f"{s.name}: times {s.start_ns}..{s.end_ns}")
    # OpenTelemetry semantic conventions: http.response.status_code is an int attribute
    code = http.attributes.get("http.response.status_code")
    if code != 201 or not isinstance(code, int):
        problems.append(f"http.response.status_code = {code!r} ({type(code).__name__}), want the "
                        f"int 201 (semantic conventions: int)")
    assert not problems, "publish trace:\n  " + "\n  ".join(problems) + f"\ntrace:\n  {describe(trace)}"


# ------------------------------------------------------------------------------------------------
# 2. W3C trace context continued
# ------------------------------------------------------------------------------------------------
def test_traceparent_continues_the_callers_trace(tele_node, otlp_receiver):
    node, rx = tele_node, otlp_receiver
    header, trace_id, parent = traceparent()
    r = requests.get(node.base + "/healthz", timeout=5,
                     headers={"traceparent": header, "tracestate": "mm=e2e,vendor=t61rcWkgMzE"})
    assert r.status_code == 200, (r.status_code, r.text[:200])
    header2, trace_id2, parent2 = traceparent()
    room = fresh_room("tele-tp")
    r2 = requests.post(node.whip_url(room), data=b"v=0\r\n", timeout=5,
                       headers={"traceparent": header2, "Content-Type": "application/sdp"})
    assert r2.status_code == 401, (r2.status_code, r2.text[:200])

    t0 = time.monotonic()
    rx.wait_for(lambda spans: {trace_id, trace_id2} <= {s.trace_id for s in spans},
                timeout=10, what=f"spans of traces {trace_id} and {trace_id2}")
    print(f"both continued traces exported after {time.monotonic() - t0:.1f}s")
    healthz = [s for s in rx.spans() if s.trace_id == trace_id]
    whip = [s for s in rx.spans() if s.trace_id == trace_id2]
    assert [s.name for s in healthz] == ["GET /healthz"], describe(healthz)
    (h,) = healthz
    assert h.parent_span_id == parent, f"parent {h.parent_span_id!r}, the caller's span is {parent}"
    assert h.kind == SERVER and HEX16.match(h.span_id) and h.span_id != parent, h
    assert h.attributes.get("http.route") == "/healthz", h.attributes
    assert h.trace_state == "mm=e2e,vendor=t61rcWkgMzE", f"tracestate {h.trace_state!r} not carried on"
    (w,) = [s for s in whip if s.name == "POST /whip/{room}"]
    assert w.parent_span_id == parent2 and w.status_code == STATUS_ERROR, (w, w.attributes)
    assert all(s.parent_span_id for s in whip), f"a root in a continued trace:\n  {describe(whip)}"


# ------------------------------------------------------------------------------------------------
# 3. floor 0: only traces with an error are exported
# ------------------------------------------------------------------------------------------------
def test_error_traces_are_kept_at_floor_zero(own_receiver, node_factory):
    rx = own_receiver
    node = node_factory(extra_args=otlp_args(rx, 0), extra_env=NODE_ENV)
    room = fresh_room("tele-floor0")
    token = node.token(room, "floor0-pub", publish=True)
    t0 = time.monotonic()
    healthy = 20
    for _ in range(healthy):
        r = requests.get(node.base + "/healthz", timeout=5)
        assert r.status_code == 200, r.status_code
    # healthy requests first: errors raise the sampler's rate for the requests after them
    statuses = []
    for _ in range(2):
        statuses.append(requests.post(node.whip_url(room), data=b"v=0\r\n", timeout=5,
                                      headers={"Content-Type": "application/sdp"}).status_code)
        statuses.append(requests.post(
            node.whip_url(room), data=b"this is not an SDP offer\r\n", timeout=5,
            headers={"Content-Type": "application/sdp",
                     "Authorization": f"Bearer {token}"}).status_code)
    assert statuses == [401, 400, 401, 400], f"bad WHIP posts answered {statuses}"

    def errors(spans):
        e = [s for s in spans if s.name == "POST /whip/{room}"]
        return e if len(e) >= 4 else None

    err = rx.wait_for(errors, timeout=10, what="the 4 refused WHIP requests' spans")
    t_err = time.monotonic() - t0
    node.stop()  # the node flushes its batch on shutdown: everything it would export is in
    spans = rx.spans()
    print(f"error spans after {t_err:.1f}s; after shutdown: {rx.summary()}")
    codes = sorted(s.attributes.get("http.response.status_code") for s in err)
    assert [str(c) for c in codes] == ["400", "400", "401", "401"], describe(err)
    assert all(s.status_code == STATUS_ERROR for s in err), describe(err)
    leaked = [s for s in spans if s.name == "GET /healthz"]
    assert not leaked, (f"{len(leaked)} of {healthy} healthy GET /healthz spans exported at "
                        f"floor 0:\n  {describe(leaked)}")
    assert len([s for s in spans if s.name == "POST /whip/{room}"]) == 4, describe(spans)


# ------------------------------------------------------------------------------------------------
# 4. metrics over OTLP
# ------------------------------------------------------------------------------------------------
def test_otlp_metrics_export(tele_node, otlp_receiver):
    rx = otlp_receiver
    requests.get(tele_node.base + "/healthz", timeout=5)  # at least one HTTP observation
    rx.clear()
    t0 = time.monotonic()
    want = {"mediamesh_rtp_packets_forwarded_total", "mediamesh_http_request_duration_seconds"}
    wait_until(lambda: want <= rx.metric_names(), 10, 0.1, f"OTLP metrics {sorted(want)}")
    t_names = time.monotonic() - t0
    # 500 ms interval: three pushes in a few seconds (the 10 s default would give at most one)
    wait_until(lambda: rx.metric_requests_count >= 3, 4, 0.1, "3 metric exports at 500 ms")
    t_three = time.monotonic() - t0
    names = rx.metric_names()
    print(f"metric names after {t_names:.2f}s, 3 exports after {t_three:.2f}s; {len(names)} names: "
          f"{sorted(names)}")
    hist = rx.metric("mediamesh_http_request_duration_seconds")
    assert hist.WhichOneof("data") == "histogram", hist
    points = hist.histogram.data_points
    assert points and sum(p.count for p in points) >= 1, hist
    assert all(len(p.bucket_counts) == len(p.explicit_bounds) + 1 for p in points), hist
    routes = {kv.value.string_value for p in points for kv in p.attributes if kv.key == "route"}
    assert "/healthz" in routes, f"route attributes of the histogram's points: {routes}"
    fwd = rx.metric("mediamesh_rtp_packets_forwarded_total")
    assert fwd.WhichOneof("data") == "sum" and fwd.sum.is_monotonic, fwd
    assert len(names) >= 10, sorted(names)


# ------------------------------------------------------------------------------------------------
# 5. trace ids in the log lines
# ------------------------------------------------------------------------------------------------
def log_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def test_logs_carry_trace_ids(tele_node, otlp_receiver):
    node, rx = tele_node, otlp_receiver
    header, trace_id, parent = traceparent()
    room = fresh_room("tele-log")
    r = requests.post(node.whip_url(room), data=b"v=0\r\n", timeout=5,
                      headers={"traceparent": header, "Content-Type": "application/sdp"})
    assert r.status_code == 401, r.status_code

    def refused():
        return [l for l in log_lines(node.stderr_text())
                if l.get("message") == "request refused" and l.get("trace_id") == trace_id]

    t0 = time.monotonic()
    try:
        (line,) = wait_until(refused, 5, 0.1, f"a 'request refused' log line with trace_id {trace_id}")
    except TimeoutError:
        others = [l for l in log_lines(node.stderr_text()) if l.get("message") == "request refused"]
        raise AssertionError(f"no 'request refused' line with trace_id {trace_id}; refused lines:\n"
                             + "\n".join(json.dumps(l) for l in others[-5:]))
    print(f"log line after {time.monotonic() - t0:.2f}s: {json.dumps(line)}")
    assert HEX32.match(line["trace_id"]), line
    span_id = line.get("span_id")
    assert isinstance(span_id, str) and HEX16.match(span_id), line
    assert span_id != parent, f"span_id is the caller's span, not the server span: {line}"
    assert line.get("client") == "127.0.0.0" and line.get("status") == 401, line
    span = rx.wait_for(lambda spans: [s for s in spans if s.trace_id == trace_id], 10,
                       what=f"the span of trace {trace_id}")[0]
    assert span.span_id == span_id, f"log span_id {span_id} != exported server span {span}"


# ------------------------------------------------------------------------------------------------
# 6. personal data never reaches the logs (nor the spans)
# ------------------------------------------------------------------------------------------------
CLIENT_IP = "127.0.0.77"
NAME = "김민수"
PHONE = "010-1234-5678"
EMAIL = "minsu.kim@example.com"
DISPLAY_NAME = f"{NAME} {PHONE}"
HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")


class SourceAddressAdapter(HTTPAdapter):
    """requests from a given local address (the node sees that client IP)."""

    def __init__(self, source: str, **kw):
        self.source = (source, 0)
        super().__init__(**kw)

    def init_poolmanager(self, *args, **kw):
        kw["source_address"] = self.source
        return super().init_poolmanager(*args, **kw)


def client_session(source: str) -> requests.Session:
    s = requests.Session()
    s.mount("http://", SourceAddressAdapter(source))
    return s


def forbidden_forms() -> dict[str, str]:
    """{form found in text: what it is}: raw, JSON \\u-escaped and percent-encoded forms."""
    forms = {CLIENT_IP: "client IP", NAME: "Hangul name", PHONE: "phone number",
             PHONE.replace("-", ""): "phone number (digits)", EMAIL: "e-mail identity"}
    esc = json.dumps(NAME)[1:-1]  # \uae40\ubbfc\uc218
    forms[esc.lower()] = "Hangul name, \\u-escaped"
    forms[esc.upper().replace("\\U", "\\u")] = "Hangul name, \\u-escaped (upper)"
    forms[urllib.parse.quote(NAME).lower()] = "Hangul name, percent-encoded"
    forms[urllib.parse.quote(NAME)] = "Hangul name, percent-encoded"
    forms[urllib.parse.quote(EMAIL, safe="")] = "e-mail, percent-encoded"
    return forms


def _strings(value, path=""):
    """All (path, string) leaves of a decoded JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k, f"{path}.<key>")
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")
    elif value is not None:
        yield path, str(value)


def _hits(s: str, forms: dict[str, str]) -> set[str]:
    """What personal data the string ``s`` holds (the forms found in it, and any Hangul)."""
    hit = {what for form, what in forms.items() if form in s}
    if HANGUL.search(s):
        hit.add("Hangul text")
    return hit


def find_leaks(text: str, secrets_: dict[str, str]) -> list[str]:
    """Every log line holding personal data: raw text, and each decoded JSON string."""
    leaks = []
    forms = forbidden_forms()
    forms.update(secrets_)
    for no, line in enumerate(text.splitlines(), 1):
        found = {what for form, what in forms.items() if form in line or form in line.lower()}
        where = ""
        try:
            obj = json.loads(line) if line.lstrip().startswith("{") else None
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            fields = []
            for path, s in _strings(obj):
                hit = _hits(s, forms)
                if hit:
                    fields.append(f"{path.lstrip('.')}={s[:120]!r} ({', '.join(sorted(hit))})")
                    found |= hit
            where = (f"target={obj.get('target')!r} level={obj.get('level')} "
                     f"message={str(obj.get('message'))[:120]!r} fields: {'; '.join(fields)}")
        elif HANGUL.search(line):
            found.add("Hangul text")
        if found:
            leaks.append(f"line {no}: {', '.join(sorted(found))}: {where or line[:300]}")
    return leaks


def span_leaks(spans, secrets_: dict[str, str]) -> list[str]:
    forms = forbidden_forms()
    forms.update(secrets_)
    out = []
    for s in spans:
        values = [("name", s.name), ("status_message", s.status_message)]
        values += list(_strings(s.attributes, "attributes"))
        values += list(_strings(s.resource, "resource"))
        values += list(_strings([list(e) for e in s.events], "events"))
        for path, v in values:
            hit = _hits(v, forms)
            if hit:
                out.append(f"span {s.name} {s.span_id}: {path}={v[:120]!r} ({', '.join(sorted(hit))})")
    return out


def ws_connect(node, source: str, path: str = "/signal", timeout: float = 10.0):
    """A WebSocket (websocket-client) to the node from the local address ``source``."""
    import websocket  # websocket-client, installed with selenium

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", node.http_port))
    return websocket.create_connection(f"ws://127.0.0.1:{node.http_port}{path}", socket=sock,
                                       timeout=timeout)


def ws_recv_until(ws, key: str, deadline: float) -> dict:
    seen = []
    while time.monotonic() < deadline:
        msg = json.loads(ws.recv())
        seen.append(msg)
        if key in msg:
            return msg
        if "error" in msg:
            raise AssertionError(f"signaling error instead of {key!r}: {msg}")
    raise TimeoutError(f"no {key!r} message; got {seen}")


def test_leak_finder_can_fail():
    """Node-less: the checks of test 6 find each form of personal data in a log line and in a
    span, and pass the masked forms."""
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtaW5zdSJ9.c2ln"
    bad = [
        {"message": "request", "client": CLIENT_IP},
        {"message": "joined", "display_name": NAME},
        {"message": "joined", "display_name": "Kim*수"},
        {"message": "joined", "nested": {"phone": PHONE.replace("-", "")}},
        {"message": f"identity {EMAIL}"},
        {"message": f"GET /signal?access_token={token}"},
    ]
    text = "\n".join(json.dumps(l, ensure_ascii=i % 2 == 1) for i, l in enumerate(bad))
    text += "\nplain text line from " + urllib.parse.quote(NAME)
    leaks = find_leaks(text, {token: "token", token.split(".")[1]: "claims"})
    assert len(leaks) == len(bad) + 1, "\n".join(leaks)
    assert "Hangul name, \\u-escaped" in leaks[1] and "target=None" in leaks[1], leaks[1]
    assert "Hangul text" in leaks[2] and "token" in leaks[5], leaks
    ok = json.dumps({"message": "signal session joined", "display_name": "Kim*Su 010-****-5678",
                     "identity": "id:0123456789ab", "client": "127.0.0.0"})
    assert find_leaks(ok, {}) == []

    class S:  # a span-like record
        name, status_message, resource, events = "GET /x", "", {}, ()
        span_id = "0" * 16
        attributes = {"client.address": CLIENT_IP}
    assert span_leaks([S()], {}) and "client IP" in span_leaks([S()], {})[0]


def test_personal_data_never_reaches_the_logs(own_receiver, node_factory, monkeypatch):
    rx = own_receiver
    node = node_factory(extra_args=otlp_args(rx, 1),
                        extra_env={**NODE_ENV, "RUST_LOG": "info,mediamesh=debug"})
    http_ = client_session(CLIENT_IP)
    # aiortc's HTTP (whipwhep's requests.post/delete) and its ICE host candidate from 127.0.0.77
    monkeypatch.setattr(ww, "requests", types.SimpleNamespace(post=http_.post, delete=http_.delete))
    monkeypatch.setattr(ww, "_LOOPBACK", [CLIENT_IP])
    room = fresh_room("tele-pii")
    pub_token = node.token(room, NAME, publish=True)
    view_token = node.token(room, EMAIL, subscribe=True)
    phone_token = node.token(room, PHONE, subscribe=True)
    other_room_token = node.token(fresh_room("tele-other"), EMAIL, publish=True, subscribe=True)
    tokens = {t: "an access token (carries the identity)" for t in
              (pub_token, view_token, phone_token, other_room_token)}
    tokens.update({t.split(".")[1]: "an access token's claims (base64 identity)" for t in tokens})
    t0 = time.monotonic()
    # (a) WHIP publish as 김민수, WHEP viewer as the e-mail identity, both from 127.0.0.77
    steps = ww.run(publish_and_view(node, room, pub_token, view_token), timeout=60)
    # (b) refused requests: a token for another room, no token, a token in a query string
    steps["whep other room"] = http_.post(
        node.whep_url(room), data=b"v=0\r\n", timeout=5,
        headers={"Authorization": f"Bearer {other_room_token}", "Content-Type": "application/sdp"}).status_code
    steps["whip no token"] = http_.post(node.whip_url(room), data=b"v=0\r\n", timeout=5,
                                        headers={"Content-Type": "application/sdp"}).status_code
    steps["signal not upgraded"] = http_.get(
        f"{node.base}/signal?access_token={phone_token}", timeout=5).status_code
    assert steps["whep other room"] >= 400 and steps["whip no token"] == 401, steps
    # (c) WebSocket signaling from 127.0.0.77: join with the name + phone display name
    ws = ws_connect(node, CLIENT_IP)
    assert ws.sock.getsockname()[0] == CLIENT_IP, ws.sock.getsockname()
    try:
        ws.send(json.dumps({"id": 1, "join": {"room": room, "role": "subscriber", "token": phone_token,
                                              "display_name": DISPLAY_NAME}}, ensure_ascii=False))
        joined = ws_recv_until(ws, "joined", time.monotonic() + 10)
        assert joined.get("id") == 1 and joined["joined"].get("session"), joined
        ws.send(json.dumps({"id": 2, "ping": {"timestamp_ms": 7}}))
        ws_recv_until(ws, "pong", time.monotonic() + 5)
        ws.send(json.dumps({"leave": {}}))
        try:
            while ws.recv():
                pass
        except Exception:  # closed by the node
            pass
    finally:
        ws.close()
    steps["ws"] = "joined"
    t_traffic = time.monotonic() - t0

    # let the spans go out, then stop the node: its logs and the span batch are flushed
    rx.wait_for(lambda spans: any(s.name.startswith("signal.") for s in spans), timeout=10,
                what="signal spans")
    node.stop()
    assert node.graceful, "node needed SIGKILL"
    text = node.stderr_text() + "\n" + node.log_path.read_text(errors="replace")
    lines = log_lines(text)
    print(f"traffic {t_traffic:.1f}s ({steps}); {len(text.splitlines())} log lines, "
          f"{len(rx.spans())} spans")

    problems = [f"log {l}" for l in find_leaks(text, tokens)]
    problems += [f"OTLP {l}" for l in span_leaks(rx.spans(), tokens)]
    joined_lines = [l for l in lines if l.get("message") == "signal session joined"]
    for form in ("Kim*Su", "010-****-5678", "127.0.0.0", "id:"):
        if form not in text:
            problems.append(f"masked form {form!r} appears nowhere in the log")
    if not joined_lines:
        problems.append("no 'signal session joined' line")
    for l in joined_lines:
        if l.get("display_name") != "Kim*Su 010-****-5678" or not re.fullmatch(
                r"id:[0-9a-f]{12}", str(l.get("identity"))):
            problems.append(f"joined line: display_name {l.get('display_name')!r}, identity "
                            f"{l.get('identity')!r} (want 'Kim*Su 010-****-5678', id:<12 hex>)")
    refused = [l for l in lines if l.get("message") == "request refused"]
    if not refused or any(l.get("client") != "127.0.0.0" for l in refused):
        problems.append(f"request refused lines' clients: {[l.get('client') for l in refused]}")
    debug = [l for l in lines if l.get("message") == "request" and l.get("level") == "DEBUG"]
    if not debug:
        problems.append("no debug 'request' line although RUST_LOG=info,mediamesh=debug")
    assert not problems, "personal data / masking problems:\n  " + "\n  ".join(problems)
