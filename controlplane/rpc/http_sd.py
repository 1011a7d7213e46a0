"""Prometheus's HTTP service discovery (`http_sd_configs`): the project's nodes as scrape
targets, labelled, so a rollout's metric analysis can name canary and baseline nodes
without a hand-kept scrape config.

`GET /sd/nodes?project=P` with `Authorization: Bearer <API key>` (the reader role in P)
answers Prometheus's format: one target group per node that advertises where its
metrics are — the node label `metrics-port`, on the host named by the label
`metrics-host` or else the node's reported hostname — with labels `node` (its id),
`node_name`, `project` and each node label as `label_<key>` (characters Prometheus does
not allow in a label name become `_`). Nodes without `metrics-port` are left out.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from aiohttp import web

from controlplane.domain.fleet.nodes import NodeRegistry
from controlplane.domain.kernel.errors import DomainError
from controlplane.domain.kernel.validation import MAX_PAGE_SIZE
from controlplane.rpc.auth import ROLE_FOR, Kind, Rule, bearer
from controlplane.rpc.authn import Authenticator

log = logging.getLogger(__name__)

PORT_LABEL = "metrics-port"
HOST_LABEL = "metrics-host"
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def target_groups(nodes: list[Any], project: str) -> list[dict[str, Any]]:
    groups = []
    for node in nodes:
        port = node.labels.get(PORT_LABEL, "")
        host = node.labels.get(HOST_LABEL, "") or node.hostname
        if not port.isdigit() or not host:
            continue
        target = f"{host}:{port}"
        labels = {f"label_{_UNSAFE.sub('_', k)}": v for k, v in sorted(node.labels.items())}
        labels |= {"node": node.id, "node_name": node.name, "project": project}
        groups.append({"targets": [target], "labels": labels})
    return groups


class HttpServiceDiscovery:
    def __init__(self, nodes: NodeRegistry, authenticator: Authenticator):
        self._nodes = nodes
        self._authn = authenticator
        self._runner: web.AppRunner | None = None

    async def start(self, listen: str) -> int:
        app = web.Application()
        app.router.add_get("/sd/nodes", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, _, port = listen.rpartition(":")
        site = web.TCPSite(self._runner, host or "127.0.0.1", int(port))
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else int(port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        project = request.query.get("project", "")
        try:
            header = [(k.lower(), v) for k, v in request.headers.items()]
            identity = await self._authn.authenticate(bearer(header), Rule.READ)
            if identity.kind is Kind.ANONYMOUS:
                return _error(401, "give an API key: Authorization: Bearer <key>")
            principal = identity.principal
            role = principal.role_in(project) if principal is not None else None
            if identity.kind is not Kind.OPERATOR or role is None or role < ROLE_FOR[Rule.READ]:
                return _error(403, f"an API key with the reader role in project {project!r} is needed")
            nodes: list[Any] = []
            token = ""
            while True:
                page, token = await self._nodes.page(project, "", None, MAX_PAGE_SIZE, token)
                nodes += page
                if not token:
                    break
        except DomainError as e:
            return _error(_HTTP.get(e.code, 400), e.message)
        body = json.dumps(target_groups(nodes, project)).encode()
        return web.Response(body=body, content_type="application/json")


_HTTP = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429}


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message[:500] + "\n")
