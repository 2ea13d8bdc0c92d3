"""Real OTLP receivers on loopback ports, plain text, for tests: gRPC (traces and metrics) and HTTP/protobuf."""

import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = []

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        self.spans.extend(_spans(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class OTLPReceiver:
    def __init__(self) -> None:
        self.service = _TraceService()
        self.metrics_service = _MetricsService()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self.service, self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self.metrics_service, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def __enter__(self) -> "OTLPReceiver":
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(0)

    @property
    def spans(self):
        return list(self.service.spans)

    @property
    def metrics(self):
        return list(self.metrics_service.metrics)


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.metrics = []

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        self.metrics.extend(_metrics(request))
        return metrics_service_pb2.ExportMetricsServiceResponse()


def _metrics(request) -> list:
    return [m for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]


def _spans(request) -> list:
    found = []
    for resource_spans in request.resource_spans:
        attrs = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            found.extend((attrs, span) for span in scope_spans.spans)
    return found


class HTTPReceiver:
    """A real OTLP/HTTP (protobuf) receiver: POST /v1/traces and /v1/metrics on a loopback port."""

    def __init__(self) -> None:
        self.spans: list = []
        self.metrics: list = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server method name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    receiver.spans.extend(_spans(request))
                    reply = trace_service_pb2.ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    request = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                    receiver.metrics.extend(_metrics(request))
                    reply = metrics_service_pb2.ExportMetricsServiceResponse()
                else:
                    self.send_error(404)
                    return
                data = reply.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def __enter__(self) -> "HTTPReceiver":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
