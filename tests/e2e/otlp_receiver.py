"""A real OTLP/gRPC receiver for the mediamesh end-to-end tests (traces, metrics, logs).

It is a plain ``grpc.server`` on ``127.0.0.1:<free port>`` implementing the three OTLP collector
services from ``opentelemetry-proto``:

  opentelemetry.proto.collector.trace.v1.TraceService/Export      spans -> ``SpanRecord`` list
  opentelemetry.proto.collector.metrics.v1.MetricsService/Export  requests kept, metric names
  opentelemetry.proto.collector.logs.v1.LogsService/Export        ``LogRecord`` list

Usage::

    rx = OtlpReceiver().start()
    # point the node at rx.endpoint  (http://127.0.0.1:<port>, the OTLP/gRPC default scheme)
    spans = rx.wait_for(lambda spans: [s for s in spans if s.name == "whep"], timeout=10)
    for trace_id, spans in rx.traces().items(): ...
    rx.stop()

Every Export answers success (an empty response: no partial-success rejections), so an exporter
never sees errors.  gzip-compressed requests are accepted (grpc decompresses them).
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

# opentelemetry.proto.trace.v1.Span.SpanKind
SPAN_KIND = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
# opentelemetry.proto.trace.v1.Status.StatusCode
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpanRecord:
    trace_id: str                 # 32 hex chars
    span_id: str                  # 16 hex chars
    parent_span_id: str           # 16 hex chars, or '' for a root span
    name: str
    kind: int                     # SpanKind number (see SPAN_KIND); 2 = SERVER, 3 = CLIENT
    attributes: dict              # str -> str | int | float | bool | bytes | list | dict
    status_code: int              # 0 unset, 1 ok, 2 error
    service_name: str             # resource attribute service.name ('' when absent)
    status_message: str = ""
    trace_state: str = ""         # W3C tracestate carried by the span ('' when none)
    start_ns: int = 0
    end_ns: int = 0
    scope_name: str = ""          # instrumentation scope (e.g. the Rust crate/target)
    resource: dict = field(default_factory=dict)
    events: tuple = ()            # ((name, attributes), ...)
    links: tuple = ()             # ((trace_id, span_id), ...)

    @property
    def kind_name(self) -> str:
        return SPAN_KIND.get(self.kind, str(self.kind))

    @property
    def duration_s(self) -> float:
        return max(self.end_ns - self.start_ns, 0) / 1e9

    @property
    def is_root(self) -> bool:
        return not self.parent_span_id

    def __str__(self) -> str:
        return (f"{self.service_name}:{self.name} [{self.kind_name}] trace={self.trace_id} "
                f"span={self.span_id} parent={self.parent_span_id or '-'} status={self.status_code}")


@dataclass(frozen=True)
class LogRecord:
    body: Any
    severity_number: int
    severity_text: str
    trace_id: str                 # hex, '' when the log was not inside a span
    span_id: str
    attributes: dict
    service_name: str
    time_ns: int = 0


def any_value(v) -> Any:
    """opentelemetry.proto.common.v1.AnyValue -> a plain python value."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, which)


def attributes(kvs) -> dict:
    """repeated KeyValue -> dict."""
    return {kv.key: any_value(kv.value) for kv in kvs}


def _hex(b: bytes) -> str:
    # an all-zero id is "no id" in OTLP (e.g. parent_span_id of a root span)
    return b.hex() if b and any(b) else ""


# ------------------------------------------------------------------------------------------------
# the receiver
# ------------------------------------------------------------------------------------------------
class OtlpReceiver:
    """OTLP/gRPC trace + metrics + logs receiver on loopback; thread-safe accessors."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, max_workers: int = 8):
        self.host = host
        self._want_port = port
        self.port: Optional[int] = None
        self._server: Optional[grpc.Server] = None
        self._cond = threading.Condition()
        self._spans: list[SpanRecord] = []
        self._logs: list[LogRecord] = []
        self._metric_requests: list = []
        self.trace_requests = 0
        self.metric_requests_count = 0
        self.log_requests_count = 0
        self._max_workers = max_workers

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "OtlpReceiver":
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="otlp-rx"),
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                     ("grpc.so_reuseport", 0)],
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
            _Export(self._add_traces, trace_service_pb2.ExportTraceServiceResponse), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            _Export(self._add_metrics, metrics_service_pb2.ExportMetricsServiceResponse), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(
            _Export(self._add_logs, logs_service_pb2.ExportLogsServiceResponse), server)
        port = server.add_insecure_port(f"{self.host}:{self._want_port}")
        if not port:
            raise RuntimeError(f"OTLP receiver: cannot bind {self.host}:{self._want_port}")
        server.start()
        self._server, self.port = server, port
        return self

    def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace).wait(grace + 5)
            self._server = None

    def __enter__(self) -> "OtlpReceiver":
        return self.start() if self._server is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>`` (OTEL_EXPORTER_OTLP_ENDPOINT for OTLP/gRPC)."""
        assert self.port, "receiver not started"
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        assert self.port, "receiver not started"
        return f"{self.host}:{self.port}"

    # ---- storage (called from the grpc threads) -------------------------------------------------
    def _add_traces(self, req) -> None:
        records = []
        for rs in req.resource_spans:
            res = attributes(rs.resource.attributes)
            svc = str(res.get("service.name", ""))
            for ss in rs.scope_spans:
                scope = ss.scope.name
                for s in ss.spans:
                    records.append(SpanRecord(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=_hex(s.parent_span_id),
                        name=s.name,
                        kind=int(s.kind),
                        attributes=attributes(s.attributes),
                        status_code=int(s.status.code),
                        status_message=s.status.message,
                        trace_state=s.trace_state,
                        service_name=svc,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        scope_name=scope,
                        resource=res,
                        events=tuple((e.name, attributes(e.attributes)) for e in s.events),
                        links=tuple((l.trace_id.hex(), l.span_id.hex()) for l in s.links),
                    ))
        with self._cond:
            self._spans.extend(records)
            self.trace_requests += 1
            self._cond.notify_all()

    def _add_metrics(self, req) -> None:
        with self._cond:
            self._metric_requests.append(req)
            self.metric_requests_count += 1
            self._cond.notify_all()

    def _add_logs(self, req) -> None:
        records = []
        for rl in req.resource_logs:
            res = attributes(rl.resource.attributes)
            svc = str(res.get("service.name", ""))
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    records.append(LogRecord(
                        body=any_value(r.body), severity_number=int(r.severity_number),
                        severity_text=r.severity_text, trace_id=_hex(r.trace_id),
                        span_id=_hex(r.span_id), attributes=attributes(r.attributes),
                        service_name=svc, time_ns=r.time_unix_nano))
        with self._cond:
            self._logs.extend(records)
            self.log_requests_count += 1
            self._cond.notify_all()

    # ---- queries --------------------------------------------------------------------------------
    def spans(self) -> list[SpanRecord]:
        with self._cond:
            return list(self._spans)

    def traces(self) -> dict[str, list[SpanRecord]]:
        """Spans grouped by trace id (hex), each list in start-time order."""
        out: dict[str, list[SpanRecord]] = {}
        for s in self.spans():
            out.setdefault(s.trace_id, []).append(s)
        for v in out.values():
            v.sort(key=lambda s: (s.start_ns, s.name))
        return out

    def children(self, span: SpanRecord) -> list[SpanRecord]:
        return [s for s in self.spans() if s.trace_id == span.trace_id and s.parent_span_id == span.span_id]

    def metric_requests(self) -> list:
        with self._cond:
            return list(self._metric_requests)

    def _metrics(self):
        """Every received ``Metric`` message, newest export first."""
        for req in reversed(self.metric_requests()):
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    yield from sm.metrics

    def metric_names(self) -> set[str]:
        """Names of all metrics received over OTLP/metrics."""
        return {m.name for m in self._metrics()}

    def metric(self, name: str):
        """The newest received ``Metric`` called ``name`` (None if none arrived)."""
        return next((m for m in self._metrics() if m.name == name), None)

    def logs(self) -> list[LogRecord]:
        with self._cond:
            return list(self._logs)

    def wait_for(self, predicate: Callable[[list[SpanRecord]], Any], timeout: float = 10.0,
                 what: str = "spans") -> Any:
        """Call ``predicate(spans)`` whenever spans arrive (and at least every 0.2 s) until it
        returns something truthy, and return that.  TimeoutError (listing what was received)
        after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                res = predicate(list(self._spans))
                if res:
                    return res
                left = deadline - time.monotonic()
                if left <= 0:
                    got = "\n  ".join(str(s) for s in self._spans[-40:]) or "(none)"
                    raise TimeoutError(
                        f"OTLP receiver: no {what} after {timeout}s; {len(self._spans)} spans in "
                        f"{self.trace_requests} trace exports, {self.metric_requests_count} metric "
                        f"exports, {self.log_requests_count} log exports; last spans:\n  {got}")
                self._cond.wait(min(left, 0.2))

    def wait_for_span(self, name: str, timeout: float = 10.0, **attrs) -> SpanRecord:
        """The first span called ``name`` whose attributes include ``attrs``."""
        def pred(spans):
            for s in spans:
                if s.name == name and all(s.attributes.get(k) == v for k, v in attrs.items()):
                    return s
            return None
        return self.wait_for(pred, timeout, what=f"span {name!r} {attrs or ''}")

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()
            self._logs.clear()
            self._metric_requests.clear()
            self.trace_requests = self.metric_requests_count = self.log_requests_count = 0

    def summary(self) -> str:
        with self._cond:
            names: dict[str, int] = {}
            for s in self._spans:
                names[s.name] = names.get(s.name, 0) + 1
            return (f"{len(self._spans)} spans in {len(set(s.trace_id for s in self._spans))} traces "
                    f"({self.trace_requests} exports): {names}; metric exports "
                    f"{self.metric_requests_count}, log exports {self.log_requests_count}")


# ------------------------------------------------------------------------------------------------
# servicers
# ------------------------------------------------------------------------------------------------
class _Export:
    """The one RPC of an OTLP collector service (grpc's generated ``add_*_to_server`` only needs
    an ``Export`` attribute): store the request, answer an empty (= full success) response."""

    def __init__(self, store: Callable[[Any], None], response: type):
        self._store, self._response = store, response

    def Export(self, request, context):
        self._store(request)
        return self._response()
