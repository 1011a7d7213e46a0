"""The one layer every RPC passes: authentication, the method's rule, and the mapping of
errors to status codes."""

from __future__ import annotations

import inspect
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from controlplane.domain import audit
from controlplane.domain.errors import PermissionDenied, Unauthenticated
from controlplane.rpc import auth
from controlplane.rpc.errors import abort


class GuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, nodes: auth.NodeAuthenticator):
        self._nodes = nodes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._wrap(method, behavior)})
        return handler

    def _wrap(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    await self._admit(method, context)
                    async for item in behavior(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await abort(context, e, method)

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                await self._admit(method, context)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await abort(context, e, method)

        return call

    async def _admit(self, method: str, context: grpc.aio.ServicerContext) -> None:
        rule = auth.POLICY.get(method)
        if rule is None:
            raise PermissionDenied(f"{method} has no authorization rule")
        token = auth.bearer(context.invocation_metadata() or ())
        identity = auth.ANONYMOUS
        if token is not None:
            identity = await self._nodes.authenticate(token)
        if rule is auth.Rule.NODE and identity.kind is not auth.Kind.NODE:
            raise Unauthenticated(f"{method} needs a node credential (authorization: Bearer <credential>)")
        if rule in _OPERATOR_RULES and identity.kind is auth.Kind.NODE:
            raise PermissionDenied(f"a node credential cannot call {method}")
        auth.set_current(identity)
        audit.set_context(identity.actor(), _request_id(context.invocation_metadata() or ()))


_OPERATOR_RULES = frozenset({auth.Rule.READ, auth.Rule.WRITE, auth.Rule.ADMIN})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


def _request_id(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    """The caller's `x-request-id` if it is sane, else a new one."""
    for key, value in metadata:
        if key == "x-request-id":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            if _REQUEST_ID.match(text):
                return text
    return uuid.uuid4().hex
