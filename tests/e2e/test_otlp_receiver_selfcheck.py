"""Self-check of the OTLP test receiver (no node needed): export a parent + child span, a metric
and a log record with the real grpc client stubs and check what the receiver reports."""

import os
import threading
import time

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from otlp_receiver import STATUS_ERROR, STATUS_OK

pytestmark = pytest.mark.timeout(60)


def kv(key, value):
    if isinstance(value, bool):
        v = common_pb2.AnyValue(bool_value=value)
    elif isinstance(value, int):
        v = common_pb2.AnyValue(int_value=value)
    elif isinstance(value, float):
        v = common_pb2.AnyValue(double_value=value)
    else:
        v = common_pb2.AnyValue(string_value=value)
    return common_pb2.KeyValue(key=key, value=v)


def resource(service):
    return resource_pb2.Resource(attributes=[kv("service.name", service), kv("host.name", "e2e")])


def test_otlp_receiver_selfcheck(otlp_receiver):
    rx = otlp_receiver
    rx.clear()
    assert rx.endpoint.startswith("http://127.0.0.1:")
    trace_id, parent_id, child_id = os.urandom(16), os.urandom(8), os.urandom(8)
    now = time.time_ns()
    parent = trace_pb2.Span(
        trace_id=trace_id, span_id=parent_id, name="POST /whep/{room}",
        kind=trace_pb2.Span.SPAN_KIND_SERVER,
        start_time_unix_nano=now, end_time_unix_nano=now + 5_000_000,
        attributes=[kv("http.request.method", "POST"), kv("http.response.status_code", 201)],
        status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_OK))
    child = trace_pb2.Span(
        trace_id=trace_id, span_id=child_id, parent_span_id=parent_id, name="room.subscribe",
        kind=trace_pb2.Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=now + 1_000_000, end_time_unix_nano=now + 4_000_000,
        attributes=[kv("retry", False), kv("ratio", 0.5)],
        status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR, message="boom"))
    req = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[
        trace_pb2.ResourceSpans(resource=resource("mediamesh-selfcheck"), scope_spans=[
            trace_pb2.ScopeSpans(scope=common_pb2.InstrumentationScope(name="selfcheck"),
                                 spans=[child, parent])])])  # child first: order must not matter

    # export from another thread while the main thread waits (wait_for must wake on arrival)
    errors = []

    def export():
        try:
            with grpc.insecure_channel(rx.address) as ch:
                resp = trace_service_pb2_grpc.TraceServiceStub(ch).Export(
                    req, timeout=10, compression=grpc.Compression.Gzip)
                assert not resp.HasField("partial_success"), resp
        except Exception as e:  # reported below
            errors.append(e)

    t0 = time.monotonic()
    th = threading.Thread(target=export)
    th.start()
    got = rx.wait_for(lambda spans: len(spans) >= 2 and spans, timeout=10, what="2 spans")
    th.join(10)
    assert not errors, errors
    print(f"2 spans received in {time.monotonic() - t0:.3f}s: {rx.summary()}")

    by_name = {s.name: s for s in got}
    p, c = by_name["POST /whep/{room}"], by_name["room.subscribe"]
    assert p.trace_id == c.trace_id == trace_id.hex() and len(p.trace_id) == 32
    assert p.span_id == parent_id.hex() and c.span_id == child_id.hex()
    assert p.parent_span_id == "" and p.is_root
    assert c.parent_span_id == p.span_id and not c.is_root
    assert p.kind == 2 and p.kind_name == "SERVER" and c.kind == 1
    assert p.status_code == STATUS_OK and c.status_code == STATUS_ERROR and c.status_message == "boom"
    assert p.service_name == c.service_name == "mediamesh-selfcheck"
    assert p.attributes == {"http.request.method": "POST", "http.response.status_code": 201}
    assert c.attributes == {"retry": False, "ratio": 0.5}
    assert p.scope_name == "selfcheck" and abs(p.duration_s - 0.005) < 1e-9
    traces = rx.traces()
    assert list(traces) == [trace_id.hex()]
    assert [s.name for s in traces[trace_id.hex()]] == ["POST /whep/{room}", "room.subscribe"]
    assert rx.children(p) == [c]
    assert rx.wait_for_span("room.subscribe", timeout=1, ratio=0.5) == c

    # metrics and logs services answer success and are recorded
    metric = metrics_pb2.Metric(name="mediamesh_rooms", gauge=metrics_pb2.Gauge(
        data_points=[metrics_pb2.NumberDataPoint(as_int=1, time_unix_nano=now)]))
    mreq = metrics_service_pb2.ExportMetricsServiceRequest(resource_metrics=[
        metrics_pb2.ResourceMetrics(resource=resource("mediamesh-selfcheck"), scope_metrics=[
            metrics_pb2.ScopeMetrics(metrics=[metric])])])
    lreq = logs_service_pb2.ExportLogsServiceRequest(resource_logs=[
        logs_pb2.ResourceLogs(resource=resource("mediamesh-selfcheck"), scope_logs=[
            logs_pb2.ScopeLogs(log_records=[logs_pb2.LogRecord(
                time_unix_nano=now, severity_number=9, severity_text="INFO",
                body=common_pb2.AnyValue(string_value="subscribed"),
                trace_id=trace_id, span_id=child_id, attributes=[kv("k", "v")])])])])
    with grpc.insecure_channel(rx.address) as ch:
        metrics_service_pb2_grpc.MetricsServiceStub(ch).Export(mreq, timeout=10)
        logs_service_pb2_grpc.LogsServiceStub(ch).Export(lreq, timeout=10)
    assert rx.metric_requests_count == 1 and rx.metric_names() == {"mediamesh_rooms"}
    assert rx.log_requests_count == 1
    (log,) = rx.logs()
    assert (log.body, log.trace_id, log.span_id, log.attributes) == (
        "subscribed", trace_id.hex(), child_id.hex(), {"k": "v"})

    # a predicate that never holds times out with a readable message, bounded
    t1 = time.monotonic()
    with pytest.raises(TimeoutError, match="2 spans in 1 trace exports"):
        rx.wait_for(lambda spans: any(s.name == "never" for s in spans), timeout=0.5)
    assert time.monotonic() - t1 < 2

    rx.clear()
    assert rx.spans() == [] and rx.traces() == {} and rx.metric_requests_count == 0
