"""Registering with the control plane, keeping the node credential, and holding a node
token for it.

The node registers once (enrollment token -> node id + credential) and keeps the
identity in the state dir. It registers again only when it has none, when the saved one
was made for another project, name or label set, or when the server refuses the saved
credential. Registering again under the same name keeps the node id; the saved
credential is presented with it, since a name with a live credential is only taken by
its holder.

The credential is only ever sent to `IssueNodeToken`, which returns a short-lived node
token; every other call carries the token. The token is renewed at two thirds of its
life (in the background, so heartbeats and reports never wait) and fetched again when
a call is refused with UNAUTHENTICATED. A server without `IssueNodeToken` (an older
one) takes the credential itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import grpc

from agent_stub.config import AgentConfig
from agent_stub.logs import EventLog
from agent_stub.rpc import bearer, error_summary
from agent_stub.state import Identity, StateStore
from agent_stub.tracing import with_context
from controlplane.api.identity.v1 import identity_pb2, identity_pb2_grpc
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc

# Renew a token when this share of its life is gone: a third of a lifetime (5 minutes at
# the default 15) is left for a renewal to succeed, through a server restart or two.
RENEW_AT = 2 / 3


class Registrar:
    def __init__(
        self,
        channel: Any,
        config: AgentConfig,
        state: StateStore,
        log: EventLog,
        clock: Callable[[], float] = time.time,
    ):
        self._stub = node_pb2_grpc.NodeServiceStub(channel)
        self._tokens = identity_pb2_grpc.IdentityServiceStub(channel)
        self.config = config
        self.state = state
        self.log = log
        self._clock = clock
        saved = state.load_identity()
        self.identity: Identity | None = saved if saved is not None and self._fits(saved) else None
        self.saved = saved
        self.registrations = 0
        self.exchanges = 0
        self._token = ""
        # Wall-clock seconds: when to renew, and when the token stops working.
        self._renew_at = 0.0
        self._expires_at = 0.0
        # False once the server answered UNIMPLEMENTED: send the credential itself.
        self._tokens_supported = True
        self._renewal: asyncio.Task[None] | None = None

    def _fits(self, saved: Identity) -> bool:
        c = self.config
        return (
            saved.project == c.project
            and (not c.name or saved.name == c.name)
            and saved.labels == c.labels
            # Another --address is registered again, so routers send traffic to it.
            and saved.address == c.address
        )

    @property
    def name(self) -> str:
        if self.config.name:
            return self.config.name
        if self.saved is not None and self.saved.project == self.config.project:
            return self.saved.name
        return self.config.hostname

    def invalidate(self) -> None:
        """A call was refused as unauthenticated: fetch a new token on the next `ensure`
        (which registers again if the credential itself is refused)."""
        self._drop_token()
        if not self._tokens_supported:
            self.identity = None

    async def ensure(self) -> Identity:
        """An identity with a live token (registering and exchanging as needed)."""
        if self.identity is None:
            self.identity = await self.register()
        stale = not self._token or self._clock() >= self._expires_at
        if self._tokens_supported and stale and not await self._exchange(self.identity):
            # The credential itself was refused (revoked, or another registration
            # replaced it): register again, then exchange the new one.
            self.identity = await self.register()
            await self._exchange(self.identity)
        return self.identity

    def bearer(self) -> str:
        """What to send as `authorization: Bearer`: the token (renewed in the background
        when due), or the credential for a server without tokens."""
        identity = self.identity
        if identity is None:
            return ""
        if not self._tokens_supported:
            return identity.credential
        if (not self._token or self._clock() >= self._renew_at) and (
            self._renewal is None or self._renewal.done()
        ):
            with contextlib.suppress(RuntimeError):  # no running loop: renew on the next ensure
                self._renewal = asyncio.get_running_loop().create_task(self._renew(identity))
        return self._token

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The bearer, and the trace context of the apply under way (agent_stub/tracing.py)."""
        token = self.bearer()
        return with_context(bearer(token) if token else ())

    async def _renew(self, identity: Identity) -> None:
        try:
            if not await self._exchange(identity):
                self.invalidate()
        except (grpc.RpcError, TimeoutError) as e:
            # Keep the current token; the next call that needs one tries again.
            self._renew_at = self._clock() + 5.0
            self.log.warning(
                "token.renew_failed", error=error_summary(e) if isinstance(e, grpc.RpcError) else "timed out"
            )

    async def _exchange(self, identity: Identity) -> bool:
        """Exchange the credential for a token; False if the credential was refused."""
        try:
            reply = await self._tokens.IssueNodeToken(
                identity_pb2.IssueNodeTokenRequest(node_id=identity.node_id),
                metadata=bearer(identity.credential),
                timeout=self.config.rpc_timeout,
            )
        except grpc.RpcError as e:
            code = e.code() if callable(getattr(e, "code", None)) else None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self.log.warning(
                    "token.unsupported", detail="server has no IssueNodeToken; sending the credential"
                )
                self._tokens_supported = False
                return True
            if code == grpc.StatusCode.UNAUTHENTICATED:
                self.log.warning("token.refused", error=error_summary(e), detail="registering again")
                self._drop_token()
                return False
            raise
        now = self._clock()
        expires = (
            reply.expires_at.seconds + reply.expires_at.nanos / 1e9 if reply.HasField("expires_at") else now
        )
        life = max(0.0, expires - now)
        self._token = reply.token
        self._expires_at = expires
        self._renew_at = now + life * RENEW_AT
        self.exchanges += 1
        self.log.info("token.issued", valid_for=f"{life:.0f}")
        return True

    def _drop_token(self) -> None:
        self._token = ""
        self._renew_at = self._expires_at = 0.0

    async def register(self) -> Identity:
        c = self.config
        self.log.info("register.start", project=c.project, name=self.name)
        saved = self.saved
        # The credential saved for this name proves this is the same node.
        proof = (
            bearer(saved.credential)
            if saved is not None and saved.project == c.project and saved.name == self.name
            else ()
        )
        reply = await self._stub.RegisterNode(
            node_pb2.RegisterNodeRequest(
                project=c.project,
                enrollment_token=c.token,
                name=self.name,
                labels=c.labels,
                agent_version=c.agent_version,
                hostname=c.hostname,
                address=c.address,
            ),
            metadata=proof,
            timeout=c.rpc_timeout,
        )
        identity = Identity(
            node_id=reply.node_id,
            credential=reply.node_credential,
            project=reply.project or c.project,
            name=self.name,
            labels=dict(c.labels),
            address=c.address,
        )
        self.state.save_identity(identity)
        self.saved = identity
        self.registrations += 1
        self._drop_token()
        self.log.set(node=identity.node_id)
        self.log.info("register.done", name=identity.name)
        return identity
