"""What authenticating a node costs the server: the node token check a reconnect storm
pays once per stream open, with no database read.

    python -m bench.identity [--tokens 10000]

Measures CPU time (process time, one core) of: verifying a node token alone; the
interceptor's whole admission of a WatchBundles open (bearer parsing, token check,
revocation floor, rate limit bucket, kind and scope checks, audit context); and, for
comparison, issuing a token (the exchange's signing half).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.api.watch.v1 import watch_pb2
from controlplane.domain.identity.node_tokens import NodeRevocations, NodeTokens, TokenKeyring
from controlplane.rpc.authn import Authenticator
from controlplane.rpc.interceptor import GuardInterceptor
from controlplane.rpc.ratelimit import RateLimiter, RateLimits
from controlplane.rpc.scope import ScopeFinder

WATCH = "/controlplane.watch.v1.WatchService/WatchBundles"


class _Context:
    def __init__(self, token: str, i: int):
        self._metadata = (("authorization", f"Bearer {token}"), ("x-request-id", f"r{i}"))
        self._peer = f"ipv4:10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:40000"

    def invocation_metadata(self) -> Any:
        return self._metadata

    def peer(self) -> str:
        return self._peer


def _per_call(seconds: float, n: int) -> str:
    return f"{seconds / n * 1e6:7.1f} us"


async def main(n: int) -> None:
    revocations = NodeRevocations({f"n-{i:016x}": 1 for i in range(0, n, 10)})  # 10% revoked once, long ago
    tokens = NodeTokens(TokenKeyring(Ed25519PrivateKey.generate()), revocations, timedelta(minutes=15))
    ids = [f"n-{i:016x}" for i in range(n)]

    start = time.process_time()
    issued = [tokens.issue(node_id, "default", 100).token for node_id in ids]
    sign = time.process_time() - start

    start = time.process_time()
    for token in issued:
        tokens.verify(token)
    verify = time.process_time() - start

    authn = Authenticator(None, tokens, None)  # type: ignore[arg-type]
    guard = GuardInterceptor(authn, ScopeFinder(), RateLimiter(RateLimits()))
    requests = [watch_pb2.WatchBundlesRequest(node_id=node_id, since_revision=100) for node_id in ids]
    contexts = [_Context(token, i) for i, token in enumerate(issued)]
    start = time.process_time()
    for request, context in zip(requests, contexts, strict=True):
        await guard._admit(WATCH, context, request, streams_in=False)
    admit = time.process_time() - start

    print(f"{n} node tokens (Ed25519, PyJWT), CPU time per call:")
    print(f"  issue (sign)                 {_per_call(sign, n)}")
    print(f"  verify                       {_per_call(verify, n)}")
    print(f"  admit a WatchBundles open    {_per_call(admit, n)}   (everything the interceptor does)")
    print(f"  a storm of {n} reconnects: {admit:.2f} s of one core")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000)
    asyncio.run(main(parser.parse_args().tokens))
