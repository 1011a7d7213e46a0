"""Callers of every kind for authorization tests: API keys by role and project, node
tokens (valid, expired, signed by a key the server does not know)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.api.identity.v1 import identity_pb2 as ipb
from controlplane.api.project.v1 import project_pb2 as ppb
from controlplane.domain.identity.node_tokens import AUDIENCE, ISSUER, TokenKeyring
from tests.support.harness import Harness, Registered, auth

OTHER_PROJECT = "other"


@dataclass
class Callers:
    """Bearer metadata per kind of caller; `None` means no credential at all."""

    by_name: dict[str, tuple[tuple[str, str], ...]]
    node: Registered
    reader_key_id: str


def claims(node: Registered, project: str = "default", expires_in: float = 600) -> dict[str, object]:
    now = int(time.time())
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": node.node_id,
        "prj": project,
        "rev": 10**9,
        "iat": now,
        "exp": int(now + expires_in),
    }


async def callers(h: Harness) -> Callers:
    """A reader, operator and admin of `default`, an admin of another project, the global
    admin, a node of `default`, and forged or expired node tokens."""
    await h.projects.CreateProject(ppb.CreateProjectRequest(name=OTHER_PROJECT))
    keys = {
        "reader": await h.api_key({"default": ipb.ROLE_READER}),
        "operator": await h.api_key({"default": ipb.ROLE_OPERATOR}),
        "admin": await h.api_key({"default": ipb.ROLE_ADMIN}),
        "other-project-admin": await h.api_key({OTHER_PROJECT: ipb.ROLE_ADMIN}),
    }
    node = await h.register("matrix-node", {"env": "prod"})
    expired = h.app.tokens.keyring.sign(claims(node, expires_in=-120))
    unknown = TokenKeyring(Ed25519PrivateKey.generate()).sign(claims(node))
    by_name = {name: auth(key) for name, key in keys.items()}
    by_name |= {
        "global-admin": auth(h.admin_key),
        "node": node.metadata,
        "expired-token": auth(expired),
        "unknown-key-token": auth(unknown),
        "none": (),
    }
    return Callers(by_name, node, keys["reader"].split("_")[1])
