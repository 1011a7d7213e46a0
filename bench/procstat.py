"""CPU and memory of a process as the kernel accounts them (/proc/<pid>/stat, status, task/*).

utime+stime in /proc/<pid>/stat cover every thread of the process, including threads that
have exited, so the delta over a window is the process's own CPU use in that window. They
are reported in clock ticks (usually 100 Hz), so a window should hold well over 10 ms of
CPU before its delta means anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: Path) -> tuple[str, list[str]]:
    text = path.read_text()
    # The command name is in parentheses and may contain spaces or parentheses itself.
    name = text[text.index("(") + 1 : text.rindex(")")]
    return name, text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process, in seconds."""
    _, f = _stat_fields(Path(f"/proc/{pid}/stat"))
    # Fields 14 and 15 of proc(5); index 0 here is field 3 (state).
    return (int(f[11]) + int(f[12])) / CLK_TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per live thread, summed by thread name (e.g. the event loop is `python`)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name, f = _stat_fields(task / "stat")
        except (FileNotFoundError, ProcessLookupError):
            continue
        key = name if task.name != str(pid) else f"{name} (main)"
        out[key] = out.get(key, 0.0) + (int(f[11]) + int(f[12])) / CLK_TCK
    return out


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@dataclass(frozen=True)
class Sample:
    """One reading of a process."""

    cpu: float
    rss: int

    @classmethod
    def of(cls, pid: int) -> Sample:
        return cls(cpu_seconds(pid), rss_bytes(pid))


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages split between the processes that map them, so
    the sum over several server processes counts their shared libraries once."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no Pss for pid {pid}")


def tree(pid: int) -> list[int]:
    """`pid` and every live descendant (a server that spawns its serving processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
    return out
