"""IdentityService: API keys, enrollment tokens, node tokens and node revocation."""

from __future__ import annotations

from datetime import timedelta

import grpc
from google.protobuf.duration_pb2 import Duration

from controlplane.api.identity.v1 import identity_pb2 as pb
from controlplane.api.identity.v1 import identity_pb2_grpc
from controlplane.domain.identity.api_keys import ApiKeyRegistry
from controlplane.domain.identity.enrollment import EnrollmentTokens
from controlplane.domain.identity.node_credentials import NodeCredentials
from controlplane.domain.identity.node_tokens import NodeTokens
from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.domain.model.identity import ApiKey, EnrollmentToken
from controlplane.domain.model.roles import Grant, Principal, Role
from controlplane.rpc import auth
from controlplane.rpc.authn import Authenticator
from controlplane.rpc.convert import timestamp

_ROLE_IN = {pb.ROLE_READER: Role.READER, pb.ROLE_OPERATOR: Role.OPERATOR, pb.ROLE_ADMIN: Role.ADMIN}
_ROLE_OUT = {v: k for k, v in _ROLE_IN.items()}
# Far beyond any TTL we accept; only guards the conversion itself.
_MAX_SECONDS = 10 * 365 * 86400


class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(
        self,
        api_keys: ApiKeyRegistry,
        enrollment: EnrollmentTokens,
        credentials: NodeCredentials,
        tokens: NodeTokens,
        authenticator: Authenticator,
    ):
        self._keys = api_keys
        self._enrollment = enrollment
        self._credentials = credentials
        self._tokens = tokens
        self._authn = authenticator

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateApiKeyResponse:
        grants = [Grant(g.project, _role(g.role, f"grants[{i}].role")) for i, g in enumerate(request.grants)]
        ttl = _duration(request.ttl, "ttl") if request.HasField("ttl") else None
        new = await self._keys.create(_principal(), request.name, grants, ttl)
        return pb.CreateApiKeyResponse(key=key_out(new.key), secret=new.secret)

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListApiKeysResponse:
        keys, token = await self._keys.page(
            _principal(), request.project, request.include_revoked, request.page_size, request.page_token
        )
        return pb.ListApiKeysResponse(keys=[key_out(k) for k in keys], next_page_token=token)

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeApiKeyResponse:
        if not request.key_id:
            raise InvalidArgument("must name the key", field="key_id")
        key = await self._keys.revoke(_principal(), request.key_id)
        self._authn.forget_key(key.id)
        return pb.RevokeApiKeyResponse(key=key_out(key))

    async def CreateEnrollmentToken(
        self, request: pb.CreateEnrollmentTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateEnrollmentTokenResponse:
        ttl = _duration(request.ttl, "ttl") if request.HasField("ttl") else None
        new = await self._enrollment.create(request.project, ttl, request.max_uses)
        return pb.CreateEnrollmentTokenResponse(token=token_out(new.token), secret=new.secret)

    async def ListEnrollmentTokens(
        self, request: pb.ListEnrollmentTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListEnrollmentTokensResponse:
        tokens = await self._enrollment.list(request.project)
        return pb.ListEnrollmentTokensResponse(tokens=[token_out(t) for t in tokens])

    async def RevokeEnrollmentToken(
        self, request: pb.RevokeEnrollmentTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeEnrollmentTokenResponse:
        token = await self._enrollment.revoke(request.project, request.token_id)
        return pb.RevokeEnrollmentTokenResponse(token=token_out(token))

    async def IssueNodeToken(
        self, request: pb.IssueNodeTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.IssueNodeTokenResponse:
        # The interceptor checked the credential and that node_id is the caller's.
        node = auth.current()
        if not request.node_id:
            raise InvalidArgument("must name the node the credential belongs to", field="node_id")
        issued = self._tokens.issue(node.subject, node.project, node.revision)
        return pb.IssueNodeTokenResponse(token=issued.token, expires_at=timestamp(issued.expires_at))

    async def RevokeNode(
        self, request: pb.RevokeNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeNodeResponse:
        if not request.node_id:
            raise InvalidArgument("must name the node", field="node_id")
        revision = await self._credentials.revoke(request.node_id, request.allow_reenroll)
        return pb.RevokeNodeResponse(revision=revision)


def _principal() -> Principal:
    principal = auth.current().principal
    assert principal is not None, "the interceptor admits only API keys here"
    return principal


def _role(value: int, field: str) -> Role:
    role = _ROLE_IN.get(pb.Role.ValueType(value))
    if role is None:
        raise InvalidArgument("must be ROLE_READER, ROLE_OPERATOR or ROLE_ADMIN", field=field)
    return role


def _duration(value: Duration, field: str) -> timedelta:
    if value.seconds < 0 or value.nanos < 0 or value.seconds > _MAX_SECONDS:
        raise InvalidArgument("must be a positive duration", field=field)
    return timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


def key_out(key: ApiKey) -> pb.ApiKey:
    return pb.ApiKey(
        id=key.id,
        name=key.name,
        grants=[pb.Grant(project=g.project, role=_ROLE_OUT[g.role]) for g in key.grants],
        created_at=timestamp(key.created_at),
        expires_at=timestamp(key.expires_at),
        revoked_at=timestamp(key.revoked_at),
        created_by=key.created_by,
    )


def token_out(token: EnrollmentToken) -> pb.EnrollmentToken:
    return pb.EnrollmentToken(
        id=token.id,
        project=token.project,
        created_at=timestamp(token.created_at),
        expires_at=timestamp(token.expires_at),
        revoked_at=timestamp(token.revoked_at),
        uses_left=token.uses_left,
    )
