"""An in-process control plane on a free port, with typed clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from controlplane.api.audit.v1 import audit_pb2_grpc
from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc
from controlplane.api.identity.v1 import identity_pb2, identity_pb2_grpc
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc
from controlplane.api.project.v1 import project_pb2_grpc
from controlplane.api.watch.v1 import watch_pb2, watch_pb2_grpc
from controlplane.bootstrap import App
from controlplane.firststart import ADMIN_KEY_FILE
from controlplane.rpc.auth import POLICY, Rule

CHUNK = 1024 * 1024


def auth(credential: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {credential}"),)


# Rules whose calls the harness signs with its admin key when the test gave no credential.
_OPERATOR_RULES = {Rule.READ, Rule.WRITE, Rule.ADMIN, Rule.NODE_OR_READ}


@dataclass
class Registered:
    node_id: str
    # The long-lived node credential (RegisterNode), only good for IssueNodeToken.
    credential: str
    # A node token for it: what every other node RPC takes.
    token: str = ""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return auth(self.token or self.credential)


class _Signer:
    """Signs operator calls that carry no `authorization` of their own with an API key,
    so tests read like an operator's session; node RPCs are left as the test made them."""

    def __init__(self, key: str):
        self.key = key

    def _sign(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        metadata = list(details.metadata or ())
        if not self.key or POLICY.get(method) not in _OPERATOR_RULES:
            return details
        if any(key == "authorization" for key, _ in metadata):
            return details
        metadata.append(("authorization", f"Bearer {self.key}"))
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*metadata),
            details.credentials,
            details.wait_for_ready,
        )


# grpc.aio files each interceptor under the first of the four kinds it is, so one class
# per kind.
class _SignUnaryUnary(_Signer, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._sign(details), request)


class _SignUnaryStream(_Signer, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._sign(details), request)


class _SignStreamUnary(_Signer, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._sign(details), request_iterator)


class _SignStreamStream(_Signer, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._sign(details), request_iterator)


def signing(key: str) -> list[Any]:
    """Client interceptors adding `key` to operator calls without a credential."""
    return [cls(key) for cls in (_SignUnaryUnary, _SignUnaryStream, _SignStreamUnary, _SignStreamStream)]


@dataclass
class Harness:
    app: App
    address: str
    token: str
    channel: grpc.aio.Channel = field(init=False)
    # The first-start global admin key of the data directory, used for operator calls
    # that carry no credential of their own.
    admin_key: str = field(init=False)

    def __post_init__(self) -> None:
        path = self.app.settings.data_dir / ADMIN_KEY_FILE
        self.admin_key = path.read_text().strip() if path.exists() else ""
        self.channel = grpc.aio.insecure_channel(self.address, interceptors=signing(self.admin_key))
        self.nodes = node_pb2_grpc.NodeServiceStub(self.channel)
        self.watch = watch_pb2_grpc.WatchServiceStub(self.channel)
        self.bundles = bundle_pb2_grpc.BundleServiceStub(self.channel)
        self.projects = project_pb2_grpc.ProjectServiceStub(self.channel)
        self.identity = identity_pb2_grpc.IdentityServiceStub(self.channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(self.channel)
        # What a real agent keeps in its state dir: registering a name again presents it.
        self._credentials: dict[tuple[str, str], str] = {}

    async def close(self) -> None:
        await self.channel.close()

    async def register(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        project: str = "default",
        token: str | None = None,
    ) -> Registered:
        """Register like an agent: present the credential saved for this name, if any,
        then exchange the new credential for a node token."""
        saved = self._credentials.get((project, name))
        reply = await self.nodes.RegisterNode(
            node_pb2.RegisterNodeRequest(
                project=project, enrollment_token=token or self.token, name=name, labels=labels or {}
            ),
            metadata=auth(saved) if saved else None,
        )
        self._credentials[(project, name)] = reply.node_credential
        return Registered(reply.node_id, reply.node_credential, await self.node_token(reply))

    async def node_token(self, reply: node_pb2.RegisterNodeResponse | Registered) -> str:
        node_id = reply.node_id
        credential = (
            reply.node_credential if isinstance(reply, node_pb2.RegisterNodeResponse) else reply.credential
        )
        issued = await self.identity.IssueNodeToken(
            identity_pb2.IssueNodeTokenRequest(node_id=node_id), metadata=auth(credential)
        )
        return str(issued.token)

    async def api_key(self, grants: dict[str, int], name: str = "test key", **kwargs: Any) -> str:
        """Mint an API key with the admin key: grants maps project (or "*") to a Role."""
        reply = await self.identity.CreateApiKey(
            identity_pb2.CreateApiKeyRequest(
                name=name,
                grants=[identity_pb2.Grant(project=p, role=r) for p, r in grants.items()],  # type: ignore[arg-type]
                **kwargs,
            )
        )
        return str(reply.secret)

    async def upload(self, archive: bytes, project: str = "default", version: str = "") -> str:
        async def requests() -> AsyncIterator[bundle_pb2.UploadBundleRequest]:
            header = bundle_pb2.UploadBundleHeader(project=project, version=version)
            for offset in range(0, max(len(archive), 1), CHUNK):
                first = offset == 0
                yield bundle_pb2.UploadBundleRequest(
                    header=header if first else None, chunk=archive[offset : offset + CHUNK]
                )

        reply = await self.bundles.UploadBundle(requests())
        return reply.bundle.digest

    async def assign(
        self,
        digest: str,
        selector: str | None = None,
        nodes: Sequence[str] = (),
        project: str = "default",
        **kwargs: Any,
    ) -> int:
        target = (
            bundle_pb2.Target(selector=selector)
            if selector is not None
            else bundle_pb2.Target(nodes=bundle_pb2.NodeList(node_ids=list(nodes)))
        )
        reply = await self.bundles.AssignBundle(
            bundle_pb2.AssignBundleRequest(project=project, target=target, digest=digest, **kwargs)
        )
        return reply.revision

    def open_watch(self, node: Registered, since: int = 0, epoch: str = "") -> Recorder:
        call = self.watch.WatchBundles(
            watch_pb2.WatchBundlesRequest(node_id=node.node_id, since_revision=since, epoch=epoch),
            metadata=node.metadata,
        )
        return Recorder(call)


class Recorder:
    """Reads a WatchBundles stream in the background and keeps every event in order."""

    def __init__(self, call: Any):
        self.call = call
        self.events: list[watch_pb2.WatchEvent] = []
        self.messages = 0
        self.error: grpc.RpcError | None = None
        self.ended = asyncio.Event()
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.messages += 1
                self.events.extend(response.events)
                self._changed.set()
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.ended.set()
            self._changed.set()

    def of(self, kind: str) -> list[Any]:
        return [getattr(e, kind) for e in self.events if e.WhichOneof("event") == kind]

    @property
    def kinds(self) -> list[str]:
        return [str(e.WhichOneof("event")) for e in self.events]

    @property
    def stream_id(self) -> str:
        return self.of("started")[0].stream_id

    @property
    def epoch(self) -> str:
        return self.of("started")[0].epoch

    def last_revision(self) -> int:
        """The cursor a node would hold after applying everything received."""
        revision = 0
        for event in self.events:
            kind = event.WhichOneof("event")
            if kind in ("desired", "snapshot_end", "bookmark"):
                revision = max(revision, getattr(event, kind).revision)
        return revision

    async def wait_for(self, predicate: Any, timeout: float = 10.0, what: str = "event") -> None:
        async def loop() -> None:
            while not predicate(self):
                if self.ended.is_set():
                    raise AssertionError(f"stream ended ({self.error}) before {what}; got {self.kinds}")
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(loop(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout}s; got {self.kinds}") from None

    async def wait_digest(self, digest: str, timeout: float = 10.0) -> watch_pb2.DesiredState:
        await self.wait_for(
            lambda r: any(d.digest == digest for d in r.of("desired")), timeout, f"digest {digest}"
        )
        return next(d for d in reversed(self.of("desired")) if d.digest == digest)

    async def cancel(self) -> None:
        self.call.cancel()
        await self.ended.wait()
