"""Running a proxy's own command (a validator, a version check) with a timeout, keeping
only the tail of what it prints: a proxy can print without bound, a reason cannot."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
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


async def run(
    argv: Sequence[str],
    *,
    seconds: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run `argv` in its own process group; kill the group after `seconds`. OSError (a
    missing program) propagates."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    assert proc.stdout is not None
    reader = asyncio.get_running_loop().create_task(collect(proc.stdout, tail))
    code: int | None
    try:
        code = await asyncio.wait_for(proc.wait(), seconds)
    except TimeoutError:
        code = None
    finally:
        if proc.returncode is None:
            kill_group(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reader, 1.0)
        reader.cancel()
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
