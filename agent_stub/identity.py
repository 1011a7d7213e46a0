"""Registering with the control plane and keeping the node credential.

The node registers once (enrollment token -> node id + credential) and keeps the
identity in the state dir. It registers again only when it has none, when the saved one
was made for another project, name or label set, or when the server refuses the saved
credential (UNAUTHENTICATED). Registering again under the same name keeps the node id.
"""

from __future__ import annotations

from typing import Any

from agent_stub.config import AgentConfig
from agent_stub.logs import EventLog
from agent_stub.state import Identity, StateStore
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc


class Registrar:
    def __init__(self, channel: Any, config: AgentConfig, state: StateStore, log: EventLog):
        self._stub = node_pb2_grpc.NodeServiceStub(channel)
        self.config = config
        self.state = state
        self.log = log
        saved = state.load_identity()
        self.identity: Identity | None = saved if saved is not None and self._fits(saved) else None
        self.saved = saved
        self.registrations = 0

    def _fits(self, saved: Identity) -> bool:
        c = self.config
        return (
            saved.project == c.project and (not c.name or saved.name == c.name) and saved.labels == c.labels
        )

    @property
    def name(self) -> str:
        if self.config.name:
            return self.config.name
        if self.saved is not None and self.saved.project == self.config.project:
            return self.saved.name
        return self.config.hostname

    def invalidate(self) -> None:
        """The credential was refused: the next `ensure` registers again."""
        self.identity = None

    async def ensure(self) -> Identity:
        if self.identity is None:
            self.identity = await self.register()
        return self.identity

    async def register(self) -> Identity:
        c = self.config
        self.log.info("register.start", project=c.project, name=self.name)
        reply = await self._stub.RegisterNode(
            node_pb2.RegisterNodeRequest(
                project=c.project,
                enrollment_token=c.token,
                name=self.name,
                labels=c.labels,
                agent_version=c.agent_version,
                hostname=c.hostname,
            ),
            timeout=c.rpc_timeout,
        )
        identity = Identity(
            node_id=reply.node_id,
            credential=reply.node_credential,
            project=reply.project or c.project,
            name=self.name,
            labels=dict(c.labels),
        )
        self.state.save_identity(identity)
        self.saved = identity
        self.registrations += 1
        self.log.set(node=identity.node_id)
        self.log.info("register.done", name=identity.name)
        return identity
