"""The one layer every RPC passes: authentication, rate limits, the method's rule, the
request's scope, and the mapping of errors to status codes.

In order, before any servicer code runs:

1. the method must have a rule in `auth.POLICY` (else PERMISSION_DENIED);
2. PUBLIC methods (health, reflection, RegisterNode) take no credential; enrollment is
   rate limited per peer address;
3. the bearer becomes an Identity (`authn.Authenticator`) — on a node stream with no
   bearer, the client certificate naming the node (mutual TLS); none, or an invalid one, is
   UNAUTHENTICATED, and failures spend the peer address's bucket, so guessing soon gets
   only RESOURCE_EXHAUSTED (a valid credential from that address still passes);
4. the identity's bucket is charged (RESOURCE_EXHAUSTED with a retry hint when empty);
5. the identity's kind must fit the rule (a node cannot call operator RPCs, an API key
   cannot act as a node): PERMISSION_DENIED;
6. the request's scope (`scope.ScopeFinder`): a node only for itself and its project,
   an operator key only with the needed role in every project the request touches.

A request whose bytes do not parse, or that carries a NUL character in any string (no
database stores one: PostgreSQL's text cannot), is INVALID_ARGUMENT naming the field,
once the caller is authenticated (step 5) and before its scope is looked up.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from prometheus_client import Counter

from controlplane.domain.audit import context as audit
from controlplane.domain.kernel import observe as log_ids
from controlplane.domain.kernel.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from controlplane.rpc import auth, observe
from controlplane.rpc.authn import ENROLLMENT_PREFIX, Authenticator
from controlplane.rpc.errors import abort
from controlplane.rpc.inflight import InFlight
from controlplane.rpc.ratelimit import RateLimiter
from controlplane.rpc.scope import Scope, ScopeFinder

REFUSED = Counter(
    "controlplane_auth_refused_total",
    "Calls refused before reaching a servicer, by reason.",
    ["reason"],
)

# Probes and tooling: never rate limited, never authenticated.
_OPEN = frozenset(m for m in auth.POLICY if m.startswith(("/grpc.health.", "/grpc.reflection.")))
_WATCH = "/controlplane.watch.v1.WatchService/WatchBundles"
_OPERATOR_RULES = frozenset({auth.Rule.READ, auth.Rule.WRITE, auth.Rule.ADMIN})
_NODE_RULES = frozenset({auth.Rule.NODE, auth.Rule.NODE_CREDENTIAL, auth.Rule.NODE_STREAM})
# Long-lived node streams share the watch's rate bucket (one call per reconnect).
_STREAMS = frozenset({_WATCH, *(m for m, r in auth.POLICY.items() if r is auth.Rule.NODE_STREAM)})


class GuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, authenticator: Authenticator, scopes: ScopeFinder, limiter: RateLimiter):
        self._authn = authenticator
        self._scopes = scopes
        self._limiter = limiter
        # Every call from admission until its handler has unwound, cancelled or not.
        self.inflight = InFlight()
        # Wrapped handlers by method: a service's handler for a method never changes, so
        # it is wrapped once instead of on every call (a reconnect storm is 10,000 calls).
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        # With several serving processes (serve --workers): returns something to await
        # when another process committed a revision this one's hub has not read yet, so a
        # call that follows a write (on any process) sees it. None otherwise.
        self.barrier: Callable[[], Awaitable[None] | None] | None = None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = handler
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrapped = handler._replace(
                    **{kind: self._wrap(method, kind, behavior)},
                    request_deserializer=_lenient(handler.request_deserializer),
                )
                break
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, kind: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        streams_in = kind.startswith("stream_")
        observed = observe.Method.of(method, kind)
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with self.inflight.track(), observe.call(observed, context):
                    try:
                        request = await self._admit(method, context, request, streams_in)
                        async for item in behavior(request, context):
                            yield item
                    except grpc.aio.AbortError:
                        raise
                    except Exception as e:
                        await abort(context, e, method)

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self.inflight.track(), observe.call(observed, context):
                try:
                    request = await self._admit(method, context, request, streams_in)
                    return await behavior(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await abort(context, e, method)

        return call

    async def _admit(
        self, method: str, context: grpc.aio.ServicerContext, request: Any, streams_in: bool
    ) -> Any:
        """Authenticate and authorize the call; returns the request to hand on (for a
        client stream, the iterator with its first message put back)."""
        if self.barrier is not None and (behind := self.barrier()) is not None:
            await behind
        rule = auth.POLICY.get(method)
        if rule is None:
            REFUSED.labels("no_rule").inc()
            raise PermissionDenied(f"{method} has no authorization rule")
        metadata = context.invocation_metadata() or ()
        request_id = _request_id(metadata)
        if rule is auth.Rule.PUBLIC:
            if method not in _OPEN:
                self._charge("anonymous", _peer(context))
            _enter(auth.ANONYMOUS, request_id)
            if streams_in:
                return _well_formed(request)
            if isinstance(request, _Refused):
                raise request.error
            return request
        first: Message | None = request
        token = auth.bearer(metadata)
        enrolling = (
            streams_in
            and rule is auth.Rule.NODE_STREAM
            and token is not None
            and token.startswith(ENROLLMENT_PREFIX)
            and self._authn.enrolls
        )
        if enrolling:
            # An Envoy's first contact: the token names no node, its first message does.
            request = _well_formed(request)
            first = await anext(aiter(request), None)
            request = _prepend(first, request)
        identity = await self._authenticate(method, rule, context, metadata, first if enrolling else None)
        self._charge(_bucket(method, identity), identity.subject)
        _check_kind(method, rule, identity)
        if streams_in and not enrolling:
            request = _well_formed(request)
            first = await anext(aiter(request), None)
            request = _prepend(first, request)
        elif isinstance(request, _Refused):
            raise request.error
        scope = await self._check_scope(method, rule, identity, first)
        _enter(identity, request_id, scope)
        return request

    async def _authenticate(
        self,
        method: str,
        rule: auth.Rule,
        context: grpc.aio.ServicerContext,
        metadata: Sequence[tuple[str, str | bytes]],
        enrolling: Message | None = None,
    ) -> auth.Identity:
        token = auth.bearer(metadata)
        try:
            if enrolling is not None and token is not None:
                return await self._authn.first_contact(token, enrolling)
            if token is None and rule is auth.Rule.NODE_STREAM and self._authn.node_certificates is not None:
                # Mutual TLS: the handshake verified the chain; the certificate names the node.
                pem = (context.auth_context() or {}).get("x509_pem_cert")
                if pem:
                    return await self._authn.certificate(pem[0])
            if token is None:
                what = "a node credential (a node token: authorization: Bearer <token>)"
                if rule is auth.Rule.NODE_STREAM:
                    what = "the node's credential or token (authorization: Bearer ...) or a node certificate"
                if rule in _OPERATOR_RULES or rule is auth.Rule.NODE_OR_READ:
                    what = "an API key (authorization: Bearer cpk_...)"
                raise Unauthenticated(f"{method} needs {what}")
            return await self._authn.authenticate(token, rule)
        except Unauthenticated:
            REFUSED.labels("unauthenticated").inc()
            # Failures spend the address's bucket: past it, guessing gets only a retry
            # hint. A valid credential from the same address is never held back by it.
            wait = self._limiter.take("anonymous", _peer(context))
            if wait is not None:
                REFUSED.labels("rate_limited").inc()
                raise ResourceExhausted(
                    "too many calls without a valid credential from this address", retry_after_ms=_ms(wait)
                ) from None
            raise

    def _charge(self, bucket: str, key: str) -> None:
        wait = self._limiter.take(bucket, key)
        if wait is not None:
            REFUSED.labels("rate_limited").inc()
            raise ResourceExhausted(
                f"rate limit of this {bucket} identity reached; retry later", retry_after_ms=_ms(wait)
            )

    async def _check_scope(
        self, method: str, rule: auth.Rule, identity: auth.Identity, request: Message | None
    ) -> Scope:
        node = identity.kind is auth.Kind.NODE
        scope = await self._scopes.scope(method, request, resolve=not node)
        if node:
            for node_id in scope.node_ids:
                if node_id != identity.subject:
                    REFUSED.labels("scope").inc()
                    raise PermissionDenied(
                        f"node {identity.subject} cannot act for node {node_id!r}", field="node_id"
                    )
            for project in scope.projects:
                if project != identity.project:
                    REFUSED.labels("scope").inc()
                    raise PermissionDenied(
                        f"node {identity.subject} belongs to another project", field="project"
                    )
            return scope
        principal = identity.principal
        assert principal is not None
        need = auth.ROLE_FOR[rule]
        projects = scope.all_projects
        if not projects and scope.unknown:
            # The id names nothing: let the servicer say NOT_FOUND to any reader.
            allowed = any(role >= need for role in principal.grants.values())
        else:
            allowed = principal.allows(need, projects)
        if not allowed:
            REFUSED.labels("scope").inc()
            where = ", ".join(sorted(projects)) if projects else "every project (a global operation)"
            raise PermissionDenied(
                f"API key {identity.subject} needs the {need.label} role in {where} for {method}",
                field="project" if projects else None,
            )
        return scope


def _check_kind(method: str, rule: auth.Rule, identity: auth.Identity) -> None:
    if rule in _NODE_RULES and identity.kind is not auth.Kind.NODE:
        REFUSED.labels("kind").inc()
        raise PermissionDenied(f"{method} is for nodes; an API key cannot act as a node")
    if rule in _OPERATOR_RULES and identity.kind is not auth.Kind.OPERATOR:
        REFUSED.labels("kind").inc()
        raise PermissionDenied(f"a node token cannot call {method}")


def _bucket(method: str, identity: auth.Identity) -> str:
    if identity.kind is auth.Kind.NODE:
        return "watch" if method in _STREAMS else "node"
    return "operator"


def _enter(identity: auth.Identity, request_id: str, scope: Scope | None = None) -> None:
    auth.set_current(identity)
    audit.set_context(identity.actor(), request_id)
    # Every log line and span of this call carries these (docs/operations.md, Logs).
    node = identity.subject if identity.kind is auth.Kind.NODE else ""
    project = identity.project
    if scope is not None:
        if not node and len(scope.node_ids) == 1:
            node = next(iter(scope.node_ids))
        projects = scope.all_projects
        if not project and len(projects) == 1:
            project = next(iter(projects))
    log_ids.bind(request_id=request_id, project=project, node_id=node)
    observe.annotate(request_id=request_id, project=project, node_id=node)


class _Refused:
    """Stands in for a request refused as it was parsed: bytes that do not parse as its
    message type, or a string no database can store (a NUL character: PostgreSQL's text
    cannot hold one, so no valid request carries it)."""

    def __init__(self, error: InvalidArgument):
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """grpc answers bytes that do not parse with INTERNAL, before any handler runs; parse
    them here instead, so they become INVALID_ARGUMENT like any other bad input."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            message = deserializer(data)
        except Exception:
            return _Refused(InvalidArgument("the request is not a valid message of its type"))
        # Only bytes holding a zero byte can carry a NUL: most requests skip the walk.
        if b"\x00" in data and isinstance(message, Message):
            where = _nul_field(message)
            if where is not None:
                return _Refused(InvalidArgument("must not contain a NUL character", field=where))
        return message

    return parse


def _nul_field(message: Message, prefix: str = "") -> str | None:
    """The first string field (or map key or value), at any depth, holding a NUL.

    Only the fields that can lead to a string are looked at (`_string_fields`): a
    heartbeat's bytes nearly always hold a zero byte (its doubles, a present 0), so it
    comes here, and its metrics, numbers only, are skipped without being read."""
    for field, shape in _string_fields(message.DESCRIPTOR):
        if shape == _STRING:
            if "\x00" in getattr(message, field):
                return prefix + field
            continue
        name = prefix + field
        if shape == _MAP:
            for key, item in getattr(message, field).items():
                if isinstance(key, str) and "\x00" in key:
                    return f"{name}[{key!r}]"
                found = _nul_in(item, f"{name}[{key!r}]")
                if found is not None:
                    return found
        elif shape == _REPEATED:
            for i, item in enumerate(getattr(message, field)):
                found = _nul_in(item, f"{name}[{i}]")
                if found is not None:
                    return found
        elif message.HasField(field):
            found = _nul_field(getattr(message, field), name + ".")
            if found is not None:
                return found
    return None


def _nul_in(value: Any, name: str) -> str | None:
    if isinstance(value, str):
        return name if "\x00" in value else None
    if isinstance(value, Message):
        return _nul_field(value, name + ".")
    return None


# A field's shape, as plain ints (compared per field per request: cheaper than an enum).
_STRING, _MESSAGE, _REPEATED, _MAP = range(4)  # _MESSAGE: singular, read only when present


# By message type, its fields that hold a string or a message that can, with their
# shape, in number order (the order the full walk reported in). Types are few and
# fixed: each is worked out once.
_STRING_FIELDS: dict[Any, tuple[tuple[str, int], ...]] = {}


def _string_fields(descriptor: Any) -> tuple[tuple[str, int], ...]:
    """`descriptor`: a message's DESCRIPTOR (the C implementation's type or the Python
    one, depending on the protobuf backend)."""
    fields = _STRING_FIELDS.get(descriptor)
    if fields is None:
        fields = _STRING_FIELDS[descriptor] = tuple(
            (f.name, _shape(f))
            for f in sorted(descriptor.fields, key=lambda f: f.number)
            if _leads_to_string(f, set())
        )
    return fields


def _shape(field: FieldDescriptor) -> int:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return _MAP
    if field.is_repeated:
        return _REPEATED
    return _STRING if field.message_type is None else _MESSAGE


def _leads_to_string(field: FieldDescriptor, seen: set[Descriptor]) -> bool:
    if field.type == FieldDescriptor.TYPE_STRING:
        return True
    target = field.message_type
    if target is None:
        return False
    if target in seen:
        # A type met again on this path (a recursive message): whatever strings it has
        # are found where it was first met.
        return False
    seen.add(target)
    try:
        return any(_leads_to_string(f, seen) for f in target.fields)
    finally:
        seen.discard(target)


async def _well_formed(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for item in requests:
        if isinstance(item, _Refused):
            raise item.error
        yield item


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is None:
        return
    yield first
    async for item in rest:
        yield item


def _peer(context: grpc.aio.ServicerContext) -> str:
    """The caller's address without its port: `ipv4:10.0.0.7:51234` -> `ipv4:10.0.0.7`."""
    peer: str = context.peer() or "unknown"
    return peer.rpartition(":")[0] if peer.count(":") >= 2 else peer


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


def _request_id(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    """The caller's `x-request-id` if it is sane, else a new one."""
    for key, value in metadata:
        if key == "x-request-id":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            if _REQUEST_ID.match(text):
                return text
    return os.urandom(16).hex()  # 32 hex digits, like a UUID4 without its cost
