"""The answers of the ingest endpoint, as OTLP/HTTP specifies them: an
``ExportTraceServiceResponse`` (with ``partial_success``) for 200, a ``google.rpc.Status`` in the
request's encoding for 4xx/5xx."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from starlette.responses import Response

from coworker.ingest.decode import _JSON, _PROTOBUF


def _success(media: str, rejected: int, message: str) -> Response:
    response = ExportTraceServiceResponse()
    if rejected:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = message[:1000]
    if media == _JSON:
        return Response(json_format.MessageToJson(response, indent=None).encode(), media_type=_JSON)
    return Response(response.SerializeToString(), media_type=_PROTOBUF)


def _status_response(
    code: int, message: str, media: str, headers: Mapping[str, str] | None = None
) -> Response:
    # OTLP/HTTP: 4xx/5xx bodies are a google.rpc.Status in the request's encoding.
    from google.rpc import code_pb2, status_pb2

    rpc = {
        400: code_pb2.INVALID_ARGUMENT,
        401: code_pb2.UNAUTHENTICATED,
        413: code_pb2.RESOURCE_EXHAUSTED,
        415: code_pb2.INVALID_ARGUMENT,
        503: code_pb2.UNAVAILABLE,
    }.get(code, code_pb2.UNKNOWN)
    status = status_pb2.Status(code=rpc, message=message[:1000])
    if media == _JSON:
        content = json_format.MessageToJson(status, indent=None).encode()
    else:
        content = status.SerializeToString()
    return Response(content, status_code=code, media_type=media, headers=dict(headers or {}))


def _too_large(limit: int, media: str) -> Response:
    return _status_response(413, f"request body larger than {limit} bytes", media)
