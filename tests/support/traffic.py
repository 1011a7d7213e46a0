"""Measuring a traffic split: many real requests through a router, sent concurrently so a
proof over thousands of them costs seconds, not minutes."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp

# Requests in flight at once: enough to keep HAProxy busy, few enough for 2 shared cores.
CONCURRENCY = 16


async def split(port: int, count: int, concurrency: int = CONCURRENCY) -> Counter[str]:
    """`count` GETs of `/` on 127.0.0.1:`port`, each answer's body (or `HTTP <status>`,
    or `error: ...`) counted. A fresh connection per request, as separate clients would
    come: HAProxy balances each one."""
    outcomes: Counter[str] = Counter()
    left = iter(range(count))
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(force_close=True, limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            for _ in left:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/") as response:
                        body = (await response.text()).strip()
                        outcomes[body if response.status == 200 else f"HTTP {response.status}"] += 1
                except (aiohttp.ClientError, TimeoutError) as e:
                    outcomes[f"error: {type(e).__name__}"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def share(outcomes: Counter[str], body: str) -> float:
    return outcomes[body] / max(1, sum(outcomes.values()))
