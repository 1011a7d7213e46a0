"""Key material and first-start state in the data directory.

On the embedded default every secret is made on first start and kept beside the
database, readable only by the owner; in production each is configured (a flag, a
variable or a file) and shared by every replica. Nothing here serves: `bootstrap.App`
asks for what it needs before it builds the services, and the domain never sees a path.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path

from controlplane.config import Settings
from controlplane.domain.audit.context import acting_as, system
from controlplane.domain.bundles.signing import Signer, parse_seed
from controlplane.domain.identity.api_keys import ApiKeyRegistry
from controlplane.domain.identity.node_tokens import (
    TokenKeyring,
    generate_private_pem,
    load_private,
    load_public,
)
from controlplane.domain.model.bundles import SigningKey
from controlplane.domain.projects import DEFAULT_PROJECT, ProjectDirectory
from controlplane.keyfiles import load_or_create_hex, write_atomic, write_private
from controlplane.proxies import binaries
from controlplane.rpc.bundle_convert import signing_key_out
from controlplane.trusted_keys import FILE_NAME as TRUSTED_KEYS_FILE
from controlplane.trusted_keys import keys_document

log = logging.getLogger(__name__)

TOKEN_FILE = "enrollment-token"
AUDIT_KEY_FILE = "audit-key"
ADMIN_KEY_FILE = "admin-key"
TOKEN_KEY_FILE = "token-signing-key.pem"
SIGNING_KEY_FILE = "signing-key"
__all__ = ["TRUSTED_KEYS_FILE"]


def audit_key(s: Settings) -> bytes:
    """The audit chain's HMAC key: configured, else made in the data directory."""
    if s.audit_key:
        return bytes.fromhex(s.audit_key)
    key, created = load_or_create_hex(s.data_dir / AUDIT_KEY_FILE)
    if created and not s.embedded:
        log.warning(
            "generated an audit key in %s: every replica must use the same key (set CONTROLPLANE_AUDIT_KEY)",
            s.data_dir / AUDIT_KEY_FILE,
        )
    return key


def signer(s: Settings) -> Signer:
    """The bundle signing key: configured (hex, or a file of it), else a key made in the
    data directory on first start."""
    if s.signing_key:
        return Signer.from_seed(parse_seed(s.signing_key))
    if s.signing_key_file is not None:
        return Signer.from_seed(parse_seed(s.signing_key_file.read_text()))
    seed, created = load_or_create_hex(s.data_dir / SIGNING_KEY_FILE)
    if created and not s.embedded:
        log.warning(
            "generated a bundle signing key in %s: give every replica the same key "
            "(CONTROLPLANE_SIGNING_KEY_FILE) or agents must trust each replica's",
            s.data_dir / SIGNING_KEY_FILE,
        )
    return Signer.from_seed(seed)


def cross_signer(s: Settings) -> Signer | None:
    """The deployment's other key, when given: it and ours endorse each other (key
    rotation; docs/bundles.md)."""
    path = s.cross_sign_key_file
    return Signer.from_seed(parse_seed(path.read_text())) if path is not None else None


def token_keyring(s: Settings) -> TokenKeyring:
    """The node token keys: configured (a file or the PEM itself), else a key made in the
    data directory on first start."""
    if s.token_signing_key:
        pem, source = _pem(s.token_signing_key)
    else:
        path = s.data_dir / TOKEN_KEY_FILE
        if not path.exists():
            write_private(path, generate_private_pem())
            if not s.embedded:
                log.warning(
                    "generated a node token signing key in %s: every replica must use the same "
                    "key (set CONTROLPLANE_TOKEN_SIGNING_KEY)",
                    path,
                )
        pem, source = path.read_bytes(), str(path)
    verifying = [load_public(*_pem(item)) for item in s.token_verify_keys]
    return TokenKeyring(load_private(pem, source), verifying)


async def admin_key(api_keys: ApiKeyRegistry, data_dir: Path) -> str | None:
    """On a store that never had an API key, make a global admin key, keep it in the data
    directory (readable only by the owner) and return it to be printed once."""
    path = data_dir / ADMIN_KEY_FILE
    with acting_as(system("first-start")):
        # Kept before the key is committed: a crash cannot leave a key nobody holds.
        new = await api_keys.bootstrap(lambda secret: write_private(path, secret.encode() + b"\n"))
    return None if new is None else new.secret


async def enrollment_token(projects: ProjectDirectory, data_dir: Path) -> tuple[str | None, bool]:
    """On a fresh store, create the default project and keep its token in the data
    directory, readable only by the owner, so the agent command can be printed. Returns
    the token (None when there is none to show) and whether it was created now."""
    path = data_dir / TOKEN_FILE
    with acting_as(system("first-start")):
        token = await projects.ensure_default()
    if token is not None:
        write_private(path, token.encode() + b"\n")
        return token, True
    if path.exists():
        return path.read_text().strip(), False
    return None, False


def write_trusted_keys(path: Path, keys: Iterable[SigningKey], signing_key_id: str) -> None:
    """Replace `path` with the public keys (atomically: an agent reading it meanwhile sees
    the old file or the new one). Public halves only, so readable by all."""
    text = keys_document(signing_key_out(k, signing_key_id) for k in keys) + "\n"
    write_atomic(path, text.encode(), 0o644)


def agent_command(
    listen: str,
    port: int,
    token: str,
    project: str = DEFAULT_PROJECT,
    program: str = "python -m agent_stub",
    proxy: str = "",
) -> str:
    """The first session's agent: driving `proxy` (a real one, README.md), or with an
    apply command that accepts every bundle when this machine has none."""
    host = listen.rpartition(":")[0] or "127.0.0.1"
    if host in ("0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    how = f"--proxy {proxy}" if proxy else "--apply-command 'true'"
    return (
        f"{program} --server {host}:{port} --project {project} --token {token} "
        f"--labels env=dev --state-dir ./agent-state {how}"
    )


def agent_program() -> str:
    """How to run the agent installed beside this server, in a shell that has not
    activated its virtual environment: the `agent-stub` script next to this interpreter
    (relative to the working directory when under it, so `make run` prints
    `.venv/bin/agent-stub`)."""
    script = Path(sys.executable).parent / "agent-stub"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m agent_stub"
    try:
        return shlex.quote(str(script.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(script))


# Said under the agent command when this machine has no nginx.
NO_PROXY_NOTE = (
    "(no nginx here: this agent accepts bundles but drives no proxy and reports no health, "
    "so rollouts' health gates fail on it; install nginx and start the server again for "
    "an agent that runs it: README.md, docs/agent.md)"
)


def agent_proxy() -> str:
    """`nginx` when this machine can run it (the proxy the first session drives), else ''."""
    try:
        binaries.locate("nginx")
    except binaries.BinaryError:
        return ""
    return "nginx"


def _pem(value: str) -> tuple[bytes, str]:
    """A PEM given inline (an environment variable) or as a file path."""
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode(), "the configured PEM"
    return Path(value).read_bytes(), value
