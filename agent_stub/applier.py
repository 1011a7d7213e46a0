"""Turning a desired digest into the running bundle, all or nothing.

`FilesystemInstaller` is the default pipeline: download into a temp file while hashing,
verify the digest, report DOWNLOADED, unpack into a new directory, let the proxy's
`Driver` check the new tree, swap `current`, and let the driver make the proxy load it
and confirm it does. A failure before the swap leaves `current` as it was; a failure
after it swaps back and has the driver bring the previous bundle back.

The driver is pluggable. An `ApplyHook` (the `--apply-command`, or a simulator's
coroutine with a delay and a failure rate) is a driver that only checks, before the
swap (`HookDriver`); the proxy drivers (`agent_stub/drivers/`) also reload and confirm.
A simulator can also replace the whole installer.
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
from agent_stub.logs import EventLog
from agent_stub.unpack import UnpackCancelled, UnpackError, UnpackLimits, unpack
from agent_stub.verify import BundleVerifier
from controlplane.api.node.v1 import node_pb2
from controlplane.proxies.routes import Table

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

# A test can hold an install right after `current` was swapped, before the proxy is told:
# the agent logs `fault.hold` and waits until the file this variable names exists. It is
# how tests reach the moment between the swap and the confirmation (a SIGKILL there must
# leave proxy and reports agreeing after a restart) without sleeping.
HOLD_AFTER_SWAP = "AGENT_STUB_HOLD_AFTER_SWAP"


class Driver:
    """The proxy's side of an install. Every method may raise ApplyFailed with the
    proxy's own words; the defaults do nothing, which is right for a driver that has no
    proxy to talk to after the swap (an apply command)."""

    name = "none"

    async def prepare(self, request: ApplyRequest) -> None:
        """Before the swap: check the new tree (`request.bundle_dir`) with the proxy's own
        validator. Nothing has changed yet; ApplyFailed rejects the bundle."""

    async def activate(self, request: ApplyRequest) -> None:
        """After the swap: make the proxy load `current` (now `request.bundle_dir`) and
        confirm it serves it. ApplyFailed makes the installer swap back and call
        `activate` again for the previous bundle."""

    async def stop(self) -> None:
        """A first bundle failed after the swap and `current` is gone again: no proxy
        should be left running it."""

    async def reweight(self, request: ApplyRequest) -> None:
        """The running bundle stays; its traffic weight changed."""

    async def reconcile(self, request: ApplyRequest) -> None:
        """At the agent's start, before its first report: make the proxy serve `current`
        (`request.bundle_dir`), whatever a crash left it running. ApplyFailed when it
        cannot."""

    async def route(self, table: Table | None) -> None:
        """A router node's routing table: put its servers at their weights in the
        proxy's backend and confirm it runs them (None: remove the servers it added).
        Only a driver whose proxy routes takes a table; ApplyFailed says why not."""
        if table is not None:
            raise ApplyFailed(
                f"this node's {self.name} driver cannot route: a router's agent runs --proxy haproxy"
            )

    async def metrics(self, digest: str) -> node_pb2.NodeMetrics | None:
        """Health and load as the proxy itself reports them while it should be serving
        `digest` ("" before the first bundle); None when the driver has no source."""
        return None

    async def close(self) -> None:
        """The agent stops. A proxy keeps running: it serves without the agent."""


class HookDriver(Driver):
    """An ApplyHook as a driver: it checks (and may reload) before the swap, as the apply
    command always did, and is run again for a new traffic weight."""

    name = "hook"

    def __init__(self, hook: ApplyHook):
        self.hook = hook

    async def prepare(self, request: ApplyRequest) -> None:
        await self.hook(request)

    async def reweight(self, request: ApplyRequest) -> None:
        await self.hook(request)


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
    check the manifest, let the driver check the tree, swap `current`, let the driver
    load and confirm it; swap back if it cannot.

    Without a `verifier` nothing but the digest is checked: for simulators and tests of
    other parts; the agent itself always passes one (agent.py)."""

    def __init__(
        self,
        store: BundleStore,
        fetch: Fetcher,
        hook: ApplyHook | Driver,
        limits: UnpackLimits | None = None,
        fsync: bool = True,
        verifier: BundleVerifier | None = None,
        log: EventLog | None = None,
    ):
        self.store = store
        self.fetch = fetch
        self.driver: Driver = hook if isinstance(hook, Driver) else HookDriver(hook)
        self.limits = limits or UnpackLimits()
        self.fsync = fsync
        self.verifier = verifier
        self.log = log
        # While the proxy is being told to load a swapped-in bundle, it still serves the
        # one before: that is what the node says it runs (heartbeats) until it confirms.
        self._serving_before: str | None = None

    def active_digest(self) -> str:
        if self._serving_before is not None:
            return self._serving_before
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
            request = ApplyRequest(target, final, store.path_for(previous) if previous else None, node_id)
            await self.driver.prepare(request)
            self._serving_before = previous
            _local(lambda: store.swap(target.digest), "switching current")
            await self._hold()
            try:
                await self.driver.activate(request)
            except ApplyFailed as e:
                final, reason = await self._revert(e.reason, previous, node_id)
                raise ApplyFailed(reason) from None
            final = None
        finally:
            self._serving_before = None
            with contextlib.suppress(OSError):
                archive.unlink()
            for leftover in (staging, final):
                # Never the active one: an install cancelled after the swap leaves it to
                # the next start's reconciliation.
                if leftover is not None and leftover != store.active_dir():
                    store.discard(leftover)
        store.gc(keep={target.digest, previous})

    async def _revert(self, reason: str, previous: str, node_id: str) -> tuple[Path | None, str]:
        """The proxy could not run the new bundle: point `current` back at `previous` (or
        at nothing, for a first bundle) and have the driver bring that back. Returns the
        new bundle's directory to remove (None if `current` could not be moved and still
        names it) and the reason to report."""
        store = self.store
        new_dir = store.active_dir()
        try:
            if previous:
                store.swap(previous)
            else:
                store.unswap()
        except OSError as e:
            return None, f"{reason}; switching current back failed on this node: {e}"
        try:
            if previous:
                back = Target(digest=previous, revision=0)
                await self.driver.activate(ApplyRequest(back, store.path_for(previous), None, node_id))
            else:
                await self.driver.stop()
        except ApplyFailed as e:
            return new_dir, f"{reason}; bringing back {previous or 'nothing'} failed too: {e.reason}"
        if self.log is not None:
            self.log.warning("apply.reverted", back_to=previous or None, reason=reason)
        return new_dir, f"{reason}; the node is back on {previous}" if previous else reason

    async def _hold(self) -> None:
        marker = os.environ.get(HOLD_AFTER_SWAP)
        if not marker:
            return
        if self.log is not None:
            self.log.warning("fault.hold", path=marker, current=self.store.active_digest())
        # Another process creates the file: there is nothing to await but time.
        while not os.path.exists(marker):  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.05)

    async def reconcile(self, fallback: str) -> None:
        """At start, before the first report: make the proxy serve `current`. If it cannot
        (a crash left a bundle in `current` that the proxy refuses), go back to `fallback`
        (the cursor's applied bundle) so that what the node reports is what it serves."""
        store = self.store
        active = store.active_digest()
        if not active:
            return
        try:
            await self.driver.reconcile(ApplyRequest(Target(active, 0), store.path_for(active), None))
            return
        except ApplyFailed as e:
            if self.log is not None:
                self.log.error("reconcile.failed", current=active, reason=e.reason)
            if not fallback or fallback == active or not store.path_for(fallback).is_dir():
                return
        store.swap(fallback)
        try:
            await self.driver.reconcile(ApplyRequest(Target(fallback, 0), store.path_for(fallback), None))
        except ApplyFailed as e:
            if self.log is not None:
                self.log.error("reconcile.failed", current=fallback, reason=e.reason)
            return
        if self.log is not None:
            self.log.warning("reconcile.reverted", current=fallback, refused=active)

    async def route(self, table: Table | None) -> None:
        """A router's routing table, to the driver."""
        await self.driver.route(table)

    async def reweight(self, target: Target, node_id: str) -> None:
        """Tell the driver the running bundle's new TRAFFIC_WEIGHT."""
        running = self.store.active_digest()
        await self.driver.reweight(ApplyRequest(target, self.store.path_for(running), None, node_id))

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
