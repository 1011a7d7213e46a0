"""Running a proxy's own validator against a tree, and its words as a bounded reason.

The validator always sees the *new* tree at its own location, so a bundle's relative
paths resolve inside it; absolute paths into the directory the proxy runs from would
test the running bundle instead (docs/agent.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from controlplane.proxies.binaries import Binary
from controlplane.proxies.run import describe_exit, run

# Characters of a proxy's words kept in a reason; the agent's FAILED report and the
# server's validation result both have room for it with their own prefix.
REASON_LIMIT = 3000


@dataclass(frozen=True)
class Verdict:
    ok: bool
    # What the validator said (its last lines), tree paths shown relative to the tree.
    output: str
    binary: Binary

    def reason(self) -> str:
        """One bounded line-group naming the validator, its version and its words."""
        words = self.output or "(no output)"
        return bounded(f"{self.binary.kind} {self.binary.version} refused the configuration: {words}")


def bounded(text: str, limit: int = REASON_LIMIT) -> str:
    """`text` cut to `limit` characters, keeping its start and its end (a proxy names the
    file at the start and the cause at the end)."""
    if len(text) <= limit:
        return text
    keep = (limit - 5) // 2
    return text[:keep] + " ... " + text[-keep:]


def relative(text: str, tree: Path) -> str:
    """Tree paths in a proxy's words made relative: `in /var/lib/agent/bundles/<hex>/nginx.conf:3`
    reads `in nginx.conf:3`."""
    for root in {str(tree), str(tree.resolve())}:
        text = text.replace(root.rstrip("/") + "/", "")
    return text


async def validate(
    binary: Binary,
    argv: Sequence[str],
    *,
    tree: Path,
    seconds: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Verdict:
    """Run `argv` (the proxy's validator on `tree`); exit 0 passes."""
    try:
        done = await run(argv, seconds=seconds, cwd=cwd, env=env)
    except OSError as e:
        return Verdict(False, f"{binary.path} could not be run: {e}", binary)
    words = relative(done.output, tree)
    if not done.ok:
        words = (
            f"{binary.path.name} {describe_exit(done.code, seconds)}: {words}"
            if words
            else (f"{binary.path.name} {describe_exit(done.code, seconds)}")
        )
    return Verdict(done.ok, bounded(words), binary)
