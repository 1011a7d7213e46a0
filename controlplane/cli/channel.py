"""The grpc channel operator commands call through: TLS if asked, and the API key as
`authorization: Bearer` on every call (imported only by a command that calls)."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import grpc


def open_channel(
    server: str,
    api_key: str,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_server_name: str,
) -> grpc.Channel:
    if tls_ca is None:
        base = grpc.insecure_channel(server)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls_ca.read_bytes(),
            private_key=tls_key.read_bytes() if tls_key is not None else None,
            certificate_chain=tls_cert.read_bytes() if tls_cert is not None else None,
        )
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        base = grpc.secure_channel(server, credentials, options=options)
    return grpc.intercept_channel(base, _Bearer(api_key)) if api_key else base


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds `authorization: Bearer <API key>` to every call that carries none."""

    def __init__(self, key: str):
        self._key = key

    def _sign(self, details: Any) -> Any:
        metadata = list(details.metadata or ())
        if not any(k == "authorization" for k, _ in metadata):
            metadata.append(("authorization", f"Bearer {self._key}"))
        return _Details(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._sign(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._sign(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._sign(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._sign(details), request_iterator)


class _Details(
    collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready")),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass
