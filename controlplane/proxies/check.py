"""A bundle tree checked by its proxy's own validator, exactly as a node's driver runs it.

The agent runs this on a new tree before it swaps anything, the control plane on a
pushed bundle's scratch tree (its built-in `nginx`, `haproxy` and `envoy` validators):
one function, so the server cannot pass what a node would refuse for a reason of
layout. The driver's main configuration is written into the tree (nginx, HAProxy: it
includes the bundle's own file, so relative paths resolve as on a node); Envoy reads the
bundle's bootstrap with the driver's overlay, from inside the tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from controlplane.proxies import ProxyKind, envoy, haproxy, nginx
from controlplane.proxies.binaries import Binary
from controlplane.proxies.http import Address
from controlplane.proxies.validate import Verdict, validate

# The file at the top of a bundle each proxy is run from.
MAIN: dict[ProxyKind, str] = {"nginx": nginx.MAIN, "haproxy": haproxy.MAIN, "envoy": envoy.MAIN}
# The name the driver writes its own main configuration to; a bundle may not hold it.
RESERVED: dict[ProxyKind, str] = {"nginx": nginx.AGENT_MAIN, "haproxy": haproxy.AGENT_MAIN}
# The driver's status endpoint (nginx, HAProxy) or Envoy's admin address, by default.
DEFAULT_STATUS: dict[ProxyKind, str] = {
    "nginx": "127.0.0.1:9180",
    "haproxy": "127.0.0.1:9181",
    "envoy": "127.0.0.1:9901",
}


def layout_problem(kind: ProxyKind, tree: Path) -> str | None:
    """Why `kind`'s driver could not run `tree` whatever its content: no main
    configuration at its top, or a file by the name the driver writes its own to."""
    main = MAIN[kind]
    if not (tree / main).is_file():
        try:
            present = sorted(p.name for p in tree.iterdir())[:10]
        except OSError:
            present = []
        return (
            f"the bundle has no {main} at its top: the {kind} driver runs {kind} from {main} "
            f"(files at the top: {', '.join(present) or 'none'})"
        )
    reserved = RESERVED.get(kind)
    if reserved and (tree / reserved).exists():
        return f"the bundle holds {reserved}, the name the agent writes its own configuration to"
    return None


def main_text(kind: ProxyKind, *, run_dir: Path, status: Address, digest: str) -> str:
    """The driver's main configuration for the bundle `digest` (nginx, HAProxy)."""
    if kind == "nginx":
        return nginx.render_main(run_dir=run_dir, status=status, digest=digest)
    if kind == "haproxy":
        return haproxy.render_main(run_dir=run_dir, status=status, digest=digest)
    raise ValueError(f"the {kind} driver writes no main configuration of its own")


def plan(
    kind: ProxyKind, binary: Binary, tree: Path, *, run_dir: Path, status: Address, digest: str, node_id: str
) -> tuple[Path, list[str], Path | None]:
    """The absolute tree, the validator's argv and working directory; the driver's main
    configuration written into the tree first (nginx, HAProxy). Blocking: a little I/O."""
    tree = tree.absolute()
    if kind == "envoy":
        overlay = envoy.overlay(admin=status, node_id=node_id, digest=digest)
        return tree, envoy.validate_argv(binary, tree / envoy.MAIN, overlay), tree
    (tree / RESERVED[kind]).write_text(main_text(kind, run_dir=run_dir, status=status, digest=digest))
    if kind == "nginx":
        return tree, nginx.validate_argv(binary, tree / nginx.AGENT_MAIN, run_dir), None
    return tree, haproxy.validate_argv(binary, tree), None


async def check_tree(
    kind: ProxyKind,
    binary: Binary,
    tree: Path,
    *,
    run_dir: Path,
    status: Address,
    digest: str,
    node_id: str = "",
    seconds: float,
    env: Mapping[str, str] | None = None,
) -> Verdict:
    """Run `kind`'s validator on `tree` (which `layout_problem` found runnable) with a
    timeout of `seconds`. OSError if the driver's main configuration cannot be written
    into the tree."""
    tree, argv, cwd = plan(kind, binary, tree, run_dir=run_dir, status=status, digest=digest, node_id=node_id)
    environment = dict(env) if env is not None else None
    verdict = await validate(binary, argv, tree=tree, seconds=seconds, cwd=cwd, env=environment)
    return replace(verdict, output=envoy.words(verdict.output)) if kind == "envoy" else verdict
