"""The bundle pipeline: pack + validate + sign + store, and downloads to many nodes.

    python -m bench.bundles                    # realistic config, 100 MiB bundle, 100 nodes
    python -m bench.bundles --runs 10 --agents 100 --big-mib 100

1. A realistic Zentinel config (202 files, 5 MiB: a main KDL file with listeners and
   upstreams, route files, certificates, Lua scripts, JSON/YAML data, a GeoIP file) pushed with
   CreateBundle `--runs` times, one file changed each time so every push is a new bundle
   (client-observed latency: receive, parse, validate, pack, sign, store, commit). Then
   the same content again (dedup) and the stages timed in-process.
2. A 100 MiB bundle (incompressible data in four files) pushed once: latency and the
   server's peak RSS above its resident size before the push.
3. Downloads: `--agents` nodes, each with its node token, download at once through
   DownloadBundle (hashing as agents do), first the realistic bundle, then the 100 MiB one:
   wall time, aggregate MiB/s, per-download p50/p99, server CPU and peak RSS growth. The
   nodes are download clients in this one process (asyncio tasks over one channel per
   ten nodes), not agent processes: on two cores, a hundred Python processes would
   measure the scheduler; the server's side (one stream per node) is the same.

The server runs on CPU 0, this process on CPU 1 (when there are two), on a fresh data
directory under .bench-out/bundles/. Results go to .bench-out/bundles.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from bench.common import CLIENT_CPU, OUT, Operator, ServerProcess, machine, pin_self, quantiles, write_json
from bench.procstat import cpu_seconds
from bench.seed import ensure
from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc

MIB = 1024 * 1024
CHUNK = MIB


# -- inputs -------------------------------------------------------------------------------


def realistic_config(root: Path, seed: int = 7) -> dict[str, int]:
    """202 files, ~5 MiB, shaped like a real edge proxy's configuration."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    upstreams = "\n".join(
        f'    upstream "svc-{i}" {{\n        target "10.{i // 250}.{i % 250}.1:8080"\n'
        f'        target "10.{i // 250}.{i % 250}.2:8080"\n    }}'
        for i in range(60)
    )
    files["zentinel.kdl"] = (
        'schema-version "1.0"\nlisteners {\n    listener "https" {\n        address "0.0.0.0:443"\n'
        '        protocol "https"\n        tls {\n            cert-file "certs/site-0.pem"\n        }\n'
        '    }\n    listener "http" {\n        address "0.0.0.0:80"\n    }\n}\n'
        f"upstreams {{\n{upstreams}\n}}\n"
    ).encode()
    for f in range(120):
        routes = "\n".join(
            f'    route "r{f}-{j}" {{\n        matches {{\n            path-prefix "/api/{f}/{j}"\n'
            f'        }}\n        upstream "svc-{(f + j) % 60}"\n    }}'
            for j in range(12)
        )
        files[f"routes/routes-{f:03}.kdl"] = f"routes {{\n{routes}\n}}\n".encode()
    for c in range(40):
        body = "".join(
            rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
            for _ in range(4000)
        )
        files[f"certs/site-{c}.pem"] = (
            b"-----BEGIN CERTIFICATE-----\n" + body.encode() + b"\n-----END CERTIFICATE-----\n"
        )
    for s in range(30):
        files[f"lua/plugin-{s:02}.lua"] = (f"-- plugin {s}\n" + "local x = 1\n" * 1500).encode()
    for d in range(9):
        rows = ",".join(f'{{"id":{i},"weight":{rng.randint(1, 100)},"tag":"t{i % 17}"}}' for i in range(4500))
        files[f"data/table-{d}.json"] = f"[{rows}]".encode()
    files["data/geo.yaml"] = "".join(
        f"- {{cidr: 10.{i // 256}.{i % 256}.0/24, region: eu-{i % 5}}}\n" for i in range(8000)
    ).encode()
    # A GeoIP database, as edge proxies ship one: binary, barely compressible.
    files["data/geo.mmdb"] = rng.randbytes(2560 * 1024)
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return {name: len(data) for name, data in files.items()}


def big_bundle(root: Path, mib: int) -> dict[str, int]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "zentinel.kdl").write_bytes(
        b'listeners {\n    listener "h" {\n        address "0.0.0.0:80"\n    }\n}\n'
    )
    sizes = {"zentinel.kdl": (root / "zentinel.kdl").stat().st_size}
    parts = 4
    rng = random.Random(1)
    for i in range(parts):
        path = root / f"data/blob-{i}.bin"
        path.parent.mkdir(exist_ok=True)
        with path.open("wb") as f:
            for _ in range(mib // parts):
                f.write(rng.randbytes(MIB))
        sizes[f"data/blob-{i}.bin"] = path.stat().st_size
    return sizes


async def requests(
    root: Path, sizes: dict[str, int], version: str = ""
) -> AsyncIterator[bundle_pb2.CreateBundleRequest]:
    yield bundle_pb2.CreateBundleRequest(
        header=bundle_pb2.CreateBundleHeader(project="default", version=version)
    )
    for name in sorted(sizes):
        yield bundle_pb2.CreateBundleRequest(
            file=bundle_pb2.FileHeader(path=name, size_bytes=(root / name).stat().st_size)
        )
        with (root / name).open("rb") as f:
            while chunk := f.read(CHUNK):
                yield bundle_pb2.CreateBundleRequest(chunk=chunk)


# -- server memory --------------------------------------------------------------------------


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise ValueError(key)


def reset_peak(pid: int) -> int:
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _vm(pid, "VmRSS")


# -- phases ---------------------------------------------------------------------------------


async def push(
    op: Operator, root: Path, sizes: dict[str, int]
) -> tuple[float, bundle_pb2.CreateBundleResponse]:
    t0 = time.perf_counter()
    reply = await op.bundles.CreateBundle(requests(root, sizes), metadata=op.metadata, timeout=600)
    return time.perf_counter() - t0, reply


def _zentinel_validation() -> Any:
    from controlplane.domain.bundles import validators
    from controlplane.domain.bundles.archive.formats import ConfigFormat

    return validators.ValidationConfig(
        main="zentinel.kdl",
        parsers=(
            validators.KDL_SYNTAX,
            validators.ParserCheck(ConfigFormat.JSON),
            validators.ParserCheck(ConfigFormat.YAML),
            validators.ParserCheck(ConfigFormat.ZENTINEL),
        ),
    )


async def realistic(op: Operator, work: Path, runs: int) -> dict[str, Any]:
    """A Zentinel project: KDL syntax, Zentinel's structure, JSON and YAML checked."""
    from controlplane.rpc.bundle_convert import config_out

    await op.bundles.SetValidationConfig(
        bundle_pb2.SetValidationConfigRequest(project="default", config=config_out(_zentinel_validation())),
        metadata=op.metadata,
    )
    root = work / "config"
    sizes = realistic_config(root)
    latencies = []
    digest = ""
    for i in range(runs):
        (root / "routes/routes-000.kdl").write_bytes(
            (root / "routes/routes-000.kdl").read_bytes() + f"// run {i} {time.time_ns()}\n".encode()
        )
        sizes["routes/routes-000.kdl"] = (root / "routes/routes-000.kdl").stat().st_size
        elapsed, reply = await push(op, root, sizes)
        assert reply.created and reply.bundle.state == bundle_pb2.BUNDLE_STATE_VALID, (
            reply.bundle.state_reason
        )
        latencies.append(elapsed)
        digest = reply.bundle.digest
        bundle = reply.bundle
    dedup, again = await push(op, root, sizes)
    assert not again.created
    return {
        "files": len(sizes),
        "input_bytes": sum(sizes.values()),
        "archive_bytes": bundle.size_bytes,
        "create_seconds": quantiles(latencies),
        "dedup_seconds": dedup,
        "digest": digest,
        "risk": bundle_pb2.RiskLevel.Name(bundle.risk.level),
        "stages": await asyncio.to_thread(stages, root),
    }


def stages(root: Path) -> dict[str, float]:
    """The pipeline's steps on the realistic config, in-process, one after the other."""
    from controlplane.blobs.local import LocalBlobStore
    from controlplane.domain.bundles import validators
    from controlplane.domain.bundles.archive import sbom
    from controlplane.domain.bundles.archive.limits import ArchiveLimits
    from controlplane.domain.bundles.archive.manifest import scan
    from controlplane.domain.bundles.archive.pack import pack
    from controlplane.domain.bundles.archive.tree import TreeBuilder
    from controlplane.domain.bundles.signing import Signer

    zentinel_validation = _zentinel_validation()

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        tree = TreeBuilder(work / "tree", ArchiveLimits())
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            with path.open("rb") as f:
                tree.add_file(str(path.relative_to(root)), f, path.stat().st_size)
        tree.finish()
        out["receive_into_scratch"] = time.perf_counter() - t
        t = time.perf_counter()
        manifest = scan(tree.root)
        out["hash_manifest"] = time.perf_counter() - t
        cache = validators.ParseCache(tree.root)
        t = time.perf_counter()
        structure = validators.structure(manifest, cache)
        for check in zentinel_validation.parsers:
            validators.run_parser(check, zentinel_validation.main, manifest, cache)
        out["parse_validate"] = time.perf_counter() - t
        t = time.perf_counter()
        bom = sbom.build(manifest, structure)
        out["sbom"] = time.perf_counter() - t
        t = time.perf_counter()
        packed = pack(tree.root, manifest, bom, work / "a.tar.zst")
        out["pack_zstd"] = time.perf_counter() - t
        t = time.perf_counter()
        Signer.generate().sign(packed.digest)
        out["sign"] = time.perf_counter() - t
        t = time.perf_counter()
        asyncio.run(LocalBlobStore(work / "blobs").put_file(packed.digest, work / "a.tar.zst"))
        out["store_local"] = time.perf_counter() - t
    return out


async def big(op: Operator, server: ServerProcess, work: Path, mib: int) -> dict[str, Any]:
    root = work / "big"
    sizes = big_bundle(root, mib)
    before = reset_peak(server.pid)
    cpu0 = cpu_seconds(server.pid)
    elapsed, reply = await push(op, root, sizes)
    peak = _vm(server.pid, "VmHWM")
    assert reply.bundle.state == bundle_pb2.BUNDLE_STATE_VALID, reply.bundle.state_reason
    return {
        "input_bytes": sum(sizes.values()),
        "archive_bytes": reply.bundle.size_bytes,
        "create_seconds": elapsed,
        "mib_per_second": sum(sizes.values()) / MIB / elapsed,
        "server_cpu_seconds": cpu_seconds(server.pid) - cpu0,
        "server_rss_before_bytes": before,
        "server_peak_growth_bytes": peak - before,
        "digest": reply.bundle.digest,
    }


async def downloads(
    server: ServerProcess, nodes: list[dict[str, str]], digest: str, size: int
) -> dict[str, Any]:
    """Every node downloads `digest` at once, hashing it as an agent does."""
    # A few connections, as agents behind a few load balancers would share none: one per
    # ten nodes keeps this one client process from being the bottleneck on HTTP/2 framing.
    channels = [
        grpc.aio.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 8 * MIB)])
        for _ in range(max(1, len(nodes) // 10))
    ]
    start = asyncio.Event()
    times: list[float] = []

    retries = 0

    async def one(i: int, node: dict[str, str]) -> None:
        nonlocal retries
        stub = bundle_pb2_grpc.BundleServiceStub(channels[i % len(channels)])
        await start.wait()
        t0 = time.perf_counter()
        while True:
            hasher = hashlib.sha256()
            got = 0
            try:
                async for message in stub.DownloadBundle(
                    bundle_pb2.DownloadBundleRequest(project="default", digest=digest),
                    metadata=(("authorization", f"Bearer {node['token']}"),),
                    timeout=1800,
                ):
                    hasher.update(message.chunk)
                    got += len(message.chunk)
                break
            except grpc.aio.AioRpcError as e:
                # All download slots busy: back off as an agent does, honouring the hint.
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or got:
                    raise
                retries += 1
                hint = dict(e.trailing_metadata() or ()).get("retry-after-ms", "1000")
                await asyncio.sleep(int(hint) / 1000 * random.uniform(0.5, 1.0))
        assert got == size and "sha256:" + hasher.hexdigest() == digest, (got, size)
        times.append(time.perf_counter() - t0)

    tasks = [asyncio.create_task(one(i, n)) for i, n in enumerate(nodes)]
    await asyncio.sleep(0.2)
    before = reset_peak(server.pid)
    cpu0 = cpu_seconds(server.pid)
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    peak = _vm(server.pid, "VmHWM")
    for channel in channels:
        await channel.close()
    return {
        "downloads": len(nodes),
        "bundle_bytes": size,
        "wall_seconds": wall,
        "aggregate_mib_per_second": len(nodes) * size / MIB / wall,
        "per_download_seconds": quantiles(times),
        "server_cpu_seconds": cpu_seconds(server.pid) - cpu0,
        "server_peak_growth_bytes": peak - before,
        "retries_resource_exhausted": retries,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    base = OUT / "bundles"
    shutil.rmtree(base, ignore_errors=True)
    work = base / "inputs"
    server = ServerProcess(
        base / "data", extra_args=("--max-bundle-bytes", str(2 * args.big_mib * MIB + 64 * MIB))
    )
    server.start()
    op = Operator(server.target, server.data_dir)
    results: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    try:
        results["realistic"] = await realistic(op, work, args.runs)
        print("realistic:", {k: v for k, v in results["realistic"].items() if k != "stages"}, flush=True)
        print("stages:", results["realistic"]["stages"], flush=True)
        results["big"] = await big(op, server, work, args.big_mib)
        print("big:", results["big"], flush=True)
        nodes = await ensure(server.data_dir, args.agents, target=server.target)
        results["download_realistic"] = await downloads(
            server, nodes, results["realistic"]["digest"], results["realistic"]["archive_bytes"]
        )
        print("download realistic:", results["download_realistic"], flush=True)
        if args.big_downloads:
            results["download_big"] = await downloads(
                server, nodes[: args.big_downloads], results["big"]["digest"], results["big"]["archive_bytes"]
            )
            print("download big:", results["download_big"], flush=True)
    finally:
        await op.close()
        server.stop()
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10, help="realistic pushes (each a new bundle)")
    p.add_argument("--big-mib", type=int, default=100)
    p.add_argument(
        "--agents", type=int, default=100, help="nodes downloading at once (in-process download clients)"
    )
    p.add_argument(
        "--big-downloads", type=int, default=100, help="of them, how many fetch the big bundle too"
    )
    args = p.parse_args(argv)
    pin_self(CLIENT_CPU)
    results = asyncio.run(main_async(args))
    print("written to", write_json("bundles.json", results))


if __name__ == "__main__":
    main()
