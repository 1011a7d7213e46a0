"""Running a proxy's own command (a validator, a version check) with a timeout, keeping
only the tail of what it prints: a proxy can print without bound, a reason cannot.

Children are started by the standard library's `subprocess` (vfork and exec on Linux),
never by the event loop: uvloop's libuv forks, and a fork of a process running gRPC runs
gRPC's fork handlers in the child, which now and then crash it (SIGSEGV, SIGABRT) before
it runs the program: about one validator in ten on a busy control plane. The exit is
awaited through a pidfd, so this works the same under any event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Lines and characters per line kept of a command's output.
TAIL_LINES = 40
LINE_CAP = 2048


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    # The exit code; negative for a signal; None if it was killed at the timeout.
    code: int | None
    # The last TAIL_LINES lines of stdout and stderr together, in order.
    output: str

    @property
    def ok(self) -> bool:
        return self.code == 0


class Child:
    """A program in its own session (its process group is its pid), its stdout and
    stderr on one pipe read by `output`."""

    def __init__(
        self, proc: subprocess.Popen[bytes], output: asyncio.StreamReader, pipe: asyncio.BaseTransport
    ):
        self.proc = proc
        self.pid = proc.pid
        self.output = output
        self._pipe = pipe

    @classmethod
    async def start(
        cls, argv: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None
    ) -> Child:
        """OSError (a missing program) propagates."""
        proc = _spawn(argv, cwd, env)
        assert proc.stdout is not None
        loop = asyncio.get_running_loop()
        output = asyncio.StreamReader(loop=loop)
        try:
            pipe, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(output), proc.stdout)
        except BaseException:
            _reap(proc)
            raise
        return cls(proc, output, pipe)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    async def wait(self) -> int:
        """The exit status (negative: the signal), once the program has exited."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # no pidfd (Linux before 5.3): a thread waits
            return await asyncio.to_thread(self.proc.wait)
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await exited
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL to its whole process group."""
        kill_group(self.pid)

    async def stop(self) -> int:
        """Kill the group if the program still runs; its exit status, once reaped."""
        if self.proc.poll() is None:
            self.kill()
        return await self.wait()

    def close_pipe(self) -> None:
        """Once `output` is read to its end (or given up on): what is left is dropped."""
        self._pipe.close()


def _spawn(argv: Sequence[str], cwd: Path | None, env: Mapping[str, str] | None) -> subprocess.Popen[bytes]:
    # Quick (vfork and exec): no thread hop needed.
    return subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _reap(proc: subprocess.Popen[bytes]) -> None:
    kill_group(proc.pid)
    proc.wait()


async def run(
    argv: Sequence[str],
    *,
    seconds: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run `argv` in its own process group; kill the group after `seconds`. OSError (a
    missing program) propagates."""
    child = await Child.start(argv, cwd=cwd, env=env)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    reader = asyncio.get_running_loop().create_task(collect(child.output, tail))
    code: int | None
    try:
        code = await asyncio.wait_for(child.wait(), seconds)
    except TimeoutError:
        code = None
    finally:
        await child.stop()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reader, 1.0)
        reader.cancel()
        child.close_pipe()
    return Completed(tuple(argv), code, "\n".join(line for line in tail if line))


async def collect(stream: asyncio.StreamReader, tail: collections.deque[str]) -> None:
    """Keep the last lines of `stream`, bounded whatever it prints."""
    while True:
        try:
            line = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            if e.partial:
                tail.append(e.partial[:LINE_CAP].decode(errors="replace").rstrip())
            return
        except asyncio.LimitOverrunError as e:
            chunk = await stream.read(e.consumed)
            tail.append(chunk[:LINE_CAP].decode(errors="replace").rstrip() + "...")
            continue
        tail.append(line[:LINE_CAP].decode(errors="replace").rstrip())


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def describe_exit(code: int | None, seconds: float) -> str:
    if code is None:
        return f"timed out after {seconds:g}s and was killed"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
