"""A router's servers through HAProxy's runtime API (the stats socket, level admin).

`show servers state <backend>` says what the worker runs; the driver adds the servers it
lacks (`add server`, which HAProxy 2.6 creates in maintenance, then `enable server`),
moves those whose address changed (`set server … addr … port …`), sets weights (`set
server … weight`) and deletes those no longer wanted (maintenance, its sessions shut,
then `del server`). Only servers named with the driver's prefix are touched: those the
router's own configuration declares stay as they are.

Servers added at run time do not survive a reload: the new worker starts from the
configuration, so the driver applies its last table again once a reload is confirmed.
"""

from __future__ import annotations

from collections.abc import Mapping

from controlplane.proxies.http import Address
from controlplane.proxies.routes import Changes, Server

# `srv_admin_state` bit HAProxy sets on a server in forced maintenance (how `add server`
# leaves it, and how `disable server` puts it).
FORCED_MAINT = 0x01


class NoBackend(ValueError):
    """The worker has no backend of that name."""


def parse_servers_state(text: str, backend: str) -> tuple[dict[str, Server], set[str]]:
    """The servers of `backend` from `show servers state <backend>`, and the names of
    those in forced maintenance; NoBackend when HAProxy knows no such backend."""
    lines = [line for line in text.splitlines() if line.strip()]
    if any("Can't find backend" in line for line in lines):
        raise NoBackend(f"haproxy has no backend {backend!r}")
    header = next((line for line in lines if line.startswith("# be_id")), None)
    if header is None:
        raise ValueError(f"not a `show servers state` answer: {text[:120]!r}")
    names = header[2:].split()
    servers: dict[str, Server] = {}
    maint: set[str] = set()
    for line in lines:
        if line.startswith("#") or not line[0].isdigit() or " " not in line:
            continue
        row = dict(zip(names, line.split(), strict=False))
        if row.get("be_name") != backend or "srv_name" not in row:
            continue
        host = row.get("srv_addr", "-")
        if host == "-":
            host = row.get("srv_fqdn", "-")
        port = int(row.get("srv_port", "0") or 0)
        name = row["srv_name"]
        servers[name] = Server(name, Address(host, port), int(row.get("srv_uweight", "0")))
        if int(row.get("srv_admin_state", "0")) & FORCED_MAINT:
            maint.add(name)
    return servers, maint


def _address(address: Address) -> str:
    return f"[{address.host}]:{address.port}" if ":" in address.host else f"{address.host}:{address.port}"


def commands(backend: str, changes: Changes, maint: set[str], wanted: Mapping[str, Server]) -> list[str]:
    """The runtime API commands that carry out `changes` in `backend`, one per line:
    removals first (a node that left), then additions, moves and weights, then every
    wanted server taken out of maintenance."""
    out: list[str] = []
    for name in changes.remove:
        out += [
            f"set server {backend}/{name} state maint",
            f"shutdown sessions server {backend}/{name}",
            f"del server {backend}/{name}",
        ]
    for s in changes.add:
        out.append(f"add server {backend}/{s.name} {_address(s.address)} weight {s.weight}")
    for s in changes.move:
        host = s.address.host
        out += [
            f"set server {backend}/{s.name} addr {host} port {s.address.port}",
            f"set server {backend}/{s.name} weight {s.weight}",
        ]
    for s in changes.reweight:
        out.append(f"set server {backend}/{s.name} weight {s.weight}")
    added = {s.name for s in changes.add}
    out += [f"enable server {backend}/{name}" for name in sorted(wanted) if name in added or name in maint]
    return out


def refusal(command: str, answer: str) -> str | None:
    """HAProxy's words when it refused `command`, None when it took it. The runtime API
    answers success with a message of its own per command, or nothing."""
    text = answer.strip()
    if not text:
        return None
    ok = (
        "New server registered.",
        "Server deleted.",
        "IP changed from",
        "no need to change the addr",
        "port changed from",
        "no need to change the port",
    )
    if command.startswith("set server") and " addr " in command and any(p in text for p in ok):
        return None
    if any(text.startswith(p) for p in ok):
        return None
    return text
