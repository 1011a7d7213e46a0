"""Summarise a py-spy collapsed-stack file (`--format raw`): where the samples went.

    python -m bench.profsum .bench-out/profile-<run>-storm.txt [--thread main] [--top 25]

Prints the share of samples per thread, then the functions with the most inclusive samples
(a function counted once per stack) and the most self samples (the leaf frame).
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():  # py-spy may append a note of its own
            stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    # "func (path/to/file.py:123)" → "func (file.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit("/", 1)[-1].split(":")[0]
    return f"{name} ({where})" if where else name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path)
    p.add_argument("--thread", default="", help="only stacks whose thread frame contains this")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--match", default="", help="inclusive share of stacks containing this text")
    a = p.parse_args()
    stacks = load(a.file)
    threads: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        threads[frames[0]] += n
    total_all = sum(threads.values())
    print(f"{total_all} samples")
    for t, n in threads.most_common():
        print(f"  {n / total_all:6.1%}  {t}")
    if a.thread:
        stacks = [(f, n) for f, n in stacks if a.thread in f[0]]
    total = sum(n for _, n in stacks) or 1
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        for fr in {short(f) for f in frames[1:]}:
            inclusive[fr] += n
        leaf[short(frames[-1])] += n
    print(f"\ninclusive ({total} samples{' in ' + a.thread if a.thread else ''})")
    for fr, n in inclusive.most_common(a.top):
        print(f"  {n / total:6.1%}  {fr}")
    print("\nself")
    for fr, n in leaf.most_common(a.top):
        print(f"  {n / total:6.1%}  {fr}")
    if a.match:
        n = sum(c for f, c in stacks if any(a.match in x for x in f))
        print(f"\nstacks containing {a.match!r}: {n / total:.1%}")


if __name__ == "__main__":
    main()
