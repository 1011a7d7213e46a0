"""Turning a desired digest into the running bundle, all or nothing.

`FilesystemInstaller` is the default pipeline: download into a temp file while hashing,
verify the digest, report DOWNLOADED, unpack into a new directory, run the apply hook on
it, and only when the hook succeeds swap `current`. Any failure leaves `current` as it
was. The hook is pluggable (`ApplyHook`): the default runs `--apply-command`; a fleet
simulator can pass a coroutine with a delay and a failure rate, or replace the whole
installer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from agent_stub.bundles import BundleStore
from agent_stub.errors import ApplyFailed
from agent_stub.unpack import UnpackCancelled, UnpackError, UnpackLimits, unpack
from agent_stub.verify import BundleVerifier

# The server keeps 4096 characters of a FAILED report's error: leave room for the prefix.
MAX_REASON = 3500
STDERR_TAIL_LINES = 20
_LINE_CAP = 4096


@dataclass(frozen=True)
class Target:
    """The desired state being applied (from a DesiredState event)."""

    digest: str
    revision: int
    traffic_weight: int = 100
    assigned_revision: int = 0
    source: str = ""
    size_bytes: int = 0
    annotations: Mapping[str, str] = field(default_factory=dict)
    # The control plane's Ed25519 signature of the digest and the signing key's id.
    signature: bytes = b""
    key_id: str = ""


@dataclass(frozen=True)
class ApplyRequest:
    """What an apply hook gets: the unpacked bundle and what it is for."""

    target: Target
    bundle_dir: Path
    previous_dir: Path | None
    node_id: str = ""


# Raise ApplyFailed to reject the bundle; return to accept it.
ApplyHook = Callable[[ApplyRequest], Awaitable[None]]
Downloaded = Callable[[], Awaitable[None]]


class Installer(Protocol):
    def active_digest(self) -> str:
        """The digest the node is running now ("" for none)."""
        ...

    async def install(self, target: Target, node_id: str, downloaded: Downloaded) -> None:
        """Make `target` the running bundle, or raise ApplyFailed / TransientFailure and
        leave the running bundle as it was. Call `downloaded` once the bytes are verified."""
        ...

    async def reweight(self, target: Target, node_id: str) -> None:
        """The running bundle stays; tell the proxy its new traffic weight (blue-green,
        canary). Raise ApplyFailed if the proxy refuses it."""
        ...


class CommandHook:
    """Runs the operator's `--apply-command` through `/bin/sh -c` in the new bundle dir.

    Environment: BUNDLE_DIR, BUNDLE_DIGEST, BUNDLE_REVISION, TRAFFIC_WEIGHT, plus
    BUNDLE_PREVIOUS_DIR (empty for the first bundle) and NODE_ID. Exit 0 accepts the
    bundle; anything else, or running past the timeout, rejects it.
    """

    def __init__(self, command: str, timeout: float = 60.0, shell: str = "/bin/sh"):
        self.command = command
        self.timeout = timeout
        self.shell = shell

    async def __call__(self, request: ApplyRequest) -> None:
        target = request.target
        env = {
            **os.environ,
            "BUNDLE_DIR": str(request.bundle_dir),
            "BUNDLE_DIGEST": target.digest,
            "BUNDLE_REVISION": str(target.revision),
            "TRAFFIC_WEIGHT": str(target.traffic_weight),
            "BUNDLE_PREVIOUS_DIR": str(request.previous_dir or ""),
            "NODE_ID": request.node_id,
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                self.shell,
                "-c",
                self.command,
                cwd=request.bundle_dir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                # Its own process group, so a timeout kills whatever it started too.
                start_new_session=True,
            )
        except OSError as e:
            raise ApplyFailed(f"could not start the apply command: {e}") from None
        tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        assert proc.stderr is not None
        reader = asyncio.get_running_loop().create_task(_collect(proc.stderr, tail))
        try:
            try:
                code = await asyncio.wait_for(proc.wait(), self.timeout)
            except TimeoutError:
                _kill_group(proc.pid)
                await proc.wait()
                raise ApplyFailed(
                    _reason(f"apply command timed out after {self.timeout:g}s and was killed", tail)
                ) from None
        finally:
            if proc.returncode is None:
                _kill_group(proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    await proc.wait()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reader, 1.0)
            reader.cancel()
        if code != 0:
            if code < 0:
                try:
                    how = f"was killed by {signal.Signals(-code).name}"
                except ValueError:
                    how = f"was killed by signal {-code}"
            else:
                how = f"exited with code {code}"
            raise ApplyFailed(_reason(f"apply command {how}", tail))


async def _collect(stream: asyncio.StreamReader, tail: collections.deque[str]) -> None:
    """Keep the last lines of stderr, bounded whatever the command prints."""
    while True:
        try:
            line = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            if e.partial:
                tail.append(e.partial[:_LINE_CAP].decode(errors="replace").rstrip())
            return
        except asyncio.LimitOverrunError as e:
            chunk = await stream.read(e.consumed)
            tail.append(chunk[:_LINE_CAP].decode(errors="replace").rstrip() + "...")
            continue
        tail.append(line[:_LINE_CAP].decode(errors="replace").rstrip())


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _reason(head: str, tail: collections.deque[str]) -> str:
    lines = [line for line in tail if line]
    if not lines:
        return head + " (no stderr output)"
    text = head + "; last stderr lines:\n" + "\n".join(lines)
    if len(text) > MAX_REASON:
        text = head + "; last stderr lines:\n..." + text[-(MAX_REASON - len(head) - 25) :]
    return text


Fetcher = Callable[[str, Path], Awaitable[int]]
T = TypeVar("T")


def _local(step: Callable[[], T], what: str) -> T:
    """A filesystem step on this node; its failure is reported (NACK), not retried blindly."""
    try:
        return step()
    except OSError as e:
        raise ApplyFailed(f"{what} failed on this node: {e}") from None


class FilesystemInstaller:
    """Verify the signature, download, check the digest, unpack into a new directory,
    check the manifest, run the hook, swap `current`.

    Without a `verifier` nothing but the digest is checked: for simulators and tests of
    other parts; the agent itself always passes one (agent.py)."""

    def __init__(
        self,
        store: BundleStore,
        fetch: Fetcher,
        hook: ApplyHook,
        limits: UnpackLimits | None = None,
        fsync: bool = True,
        verifier: BundleVerifier | None = None,
    ):
        self.store = store
        self.fetch = fetch
        self.hook = hook
        self.limits = limits or UnpackLimits()
        self.fsync = fsync
        self.verifier = verifier

    def active_digest(self) -> str:
        return self.store.active_digest()

    async def install(self, target: Target, node_id: str, downloaded: Downloaded) -> None:
        store = self.store
        previous = store.active_digest()
        archive = store.new_download()
        staging: Path | None = None
        final: Path | None = None
        try:
            if self.verifier is not None:
                # Before a byte is downloaded: an unsigned or forged bundle costs nothing.
                await self.verifier.check_signature(target.digest, target.signature, target.key_id)
            await self.fetch(target.digest, archive)
            await downloaded()
            unpacked = staging = store.new_staging(target.digest)
            await self._unpack(archive, unpacked)
            if self.verifier is not None:
                await asyncio.to_thread(self.verifier.check_tree, unpacked)
            with contextlib.suppress(OSError):
                archive.unlink()
            final = _local(lambda: store.commit(unpacked, target.digest), "placing the bundle")
            staging = None
            await self.hook(
                ApplyRequest(target, final, store.path_for(previous) if previous else None, node_id)
            )
            _local(lambda: store.swap(target.digest), "switching current")
            final = None
        finally:
            with contextlib.suppress(OSError):
                archive.unlink()
            for leftover in (staging, final):
                if leftover is not None:
                    store.discard(leftover)
        store.gc(keep={target.digest, previous})

    async def reweight(self, target: Target, node_id: str) -> None:
        """Run the hook again on the running bundle with the new TRAFFIC_WEIGHT."""
        running = self.store.active_digest()
        await self.hook(ApplyRequest(target, self.store.path_for(running), None, node_id))

    async def _unpack(self, archive: Path, dest: Path) -> None:
        cancelled = threading.Event()
        try:
            await asyncio.to_thread(unpack, archive, dest, self.limits, cancelled=cancelled, fsync=self.fsync)
        except UnpackCancelled:
            raise asyncio.CancelledError from None
        except UnpackError as e:
            raise ApplyFailed(f"unsafe or invalid archive: {e}") from None
        except OSError as e:
            raise ApplyFailed(f"unpacking failed on this node: {e}") from None
        finally:
            cancelled.set()
