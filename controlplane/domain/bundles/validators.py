"""Per-project validation: built-in parsers, proxies' own validators, external commands.

A project's `ValidationConfig` names its entry point (`main`), the parsers run on files
matching glob patterns (KDL, JSON, YAML, or ZENTINEL = KDL plus Zentinel's structure),
the proxies whose own binary checks the bundle as a node's driver would
(`proxy_validators.py`), and the external commands (`zentinel validate --config {main}`)
run on the received files. A project without one gets `DEFAULT`: KDL (2.0 and 1.0),
JSON and YAML syntax by extension. Proxies and commands are programs run on the control
plane's host, so the server only runs programs on its allow-list (`serve
--validator-allow`).

Every validator gets absolute paths (the tree, `{main}`), whatever the server's working
directory: a relative path would point nowhere from the tree a command runs in, and a
validator that globs its input would then pass anything. A command whose input is
missing fails.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from controlplane.domain.bundles.archive import kdl_config
from controlplane.domain.bundles.archive.formats import EXTENSIONS, ConfigFormat, Parsed, parse
from controlplane.domain.bundles.archive.kdl_pool import KdlParsers, KdlParsersClosed
from controlplane.domain.bundles.archive.manifest import Manifest
from controlplane.domain.kernel.errors import InvalidArgument, Unavailable
from controlplane.domain.kernel.threads import in_thread
from controlplane.domain.model.bundles import ValidationResult
from controlplane.proxies import KINDS, ProxyKind
from controlplane.proxies.binaries import Binary
from controlplane.proxies.run import Child

DEFAULT_TIMEOUT = timedelta(seconds=30)
# A validator that needs more than ten minutes is not a validator; it also holds a
# pipeline slot that long.
MAX_TIMEOUT = timedelta(minutes=10)
MAX_PARSERS = 16
MAX_COMMANDS = 8
MAX_PROXIES = len(KINDS)
MAX_ARGV = 64
# What is kept of a command's output or a parser's errors: enough for any real error
# report, small enough to store on every bundle row.
MAX_OUTPUT = 16 * 1024


@dataclass(frozen=True)
class ParserCheck:
    format: ConfigFormat
    # Globs where `*` also matches `/`; empty: by extension (ZENTINEL: the main file).
    paths: tuple[str, ...] = ()

    def patterns(self, main: str) -> tuple[str, ...]:
        if self.paths:
            return self.paths
        if self.format is ConfigFormat.ZENTINEL and main:
            return (main,)
        return EXTENSIONS[self.format]

    def label(self, main: str) -> str:
        return f"{self.format.value}:{','.join(self.patterns(main))}"


@dataclass(frozen=True)
class CommandCheck:
    name: str
    argv: tuple[str, ...]
    timeout: timedelta = DEFAULT_TIMEOUT

    @property
    def label(self) -> str:
        return f"command:{self.name or self.argv[0]}"


@dataclass(frozen=True)
class ProxyCheck:
    """The proxy's own binary on the bundle, as the agent's driver runs it."""

    kind: ProxyKind
    timeout: timedelta = DEFAULT_TIMEOUT

    @property
    def label(self) -> str:
        return f"proxy:{self.kind}"


class ContentCheck(Protocol):
    """A check the server runs on every bundle whose content it recognizes, whatever the
    project's validation config (the xDS checks: controlplane/xds/pipeline.py). Both
    calls block (file reads, parsing): the pipeline runs them on a thread."""

    def wanted(self, root: Path, paths: Sequence[str]) -> bool: ...

    def run(self, root: Path, paths: Sequence[str]) -> ValidationResult: ...

    def structure(self, root: Path, paths: Sequence[str]) -> kdl_config.Structure | None:
        """What the content declares, in the shape risk scoring and the SBOM read (one
        entry per listener, upstream, route...); None when it does not load."""
        ...

    async def proxy(
        self, check: ProxyCheck, binary: Binary, root: Path, paths: Sequence[str]
    ) -> ValidationResult | None:
        """The project's proxy validator `check`, the way this content needs it (an xDS
        bundle holds no Envoy bootstrap: `envoy --mode validate` on one embedding its
        resources), for a bundle `wanted` took; None: the driver's check applies."""
        ...


@dataclass(frozen=True)
class ValidationConfig:
    main: str = ""
    parsers: tuple[ParserCheck, ...] = ()
    commands: tuple[CommandCheck, ...] = ()
    proxies: tuple[ProxyCheck, ...] = ()

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "main": self.main,
            "parsers": [{"format": p.format.value, "paths": list(p.paths)} for p in self.parsers],
            "commands": [
                {"name": c.name, "argv": list(c.argv), "timeout": c.timeout.total_seconds()}
                for c in self.commands
            ],
        }
        if self.proxies:
            body["proxies"] = [{"kind": p.kind, "timeout": p.timeout.total_seconds()} for p in self.proxies]
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ValidationConfig:
        return cls(
            main=str(body.get("main", "")),
            parsers=tuple(
                ParserCheck(ConfigFormat(p["format"]), tuple(p.get("paths", ())))
                for p in body.get("parsers", ())
            ),
            commands=tuple(
                CommandCheck(c.get("name", ""), tuple(c["argv"]), timedelta(seconds=float(c["timeout"])))
                for c in body.get("commands", ())
            ),
            proxies=tuple(
                ProxyCheck(proxy_kind(p["kind"]), timedelta(seconds=float(p["timeout"])))
                for p in body.get("proxies", ())
            ),
        )


def proxy_kind(name: str) -> ProxyKind:
    for kind in KINDS:
        if kind == name:
            return kind
    raise ValueError(f"unknown proxy {name!r}")


KDL_SYNTAX = ParserCheck(ConfigFormat.KDL)
# Every configuration file is read by default: a `.kdl` file that does not parse is
# refused like a broken `.json` one, not stored as valid.
DEFAULT = ValidationConfig(
    parsers=(KDL_SYNTAX, ParserCheck(ConfigFormat.JSON), ParserCheck(ConfigFormat.YAML))
)


def check_config(config: ValidationConfig, allowed: Iterable[str]) -> ValidationConfig:
    """Refuse a configuration that could never run, naming the field at fault."""
    if config.main and (
        config.main.startswith("/") or ".." in config.main.split("/") or "\x00" in config.main
    ):
        raise InvalidArgument("must be a relative path inside the bundle", field="config.main")
    if len(config.main) > 1024:
        raise InvalidArgument("at most 1024 characters", field="config.main")
    if len(config.parsers) > MAX_PARSERS:
        raise InvalidArgument(f"at most {MAX_PARSERS}", field="config.parsers")
    for i, parser in enumerate(config.parsers):
        if len(parser.paths) > MAX_PARSERS or any(not p or len(p) > 1024 for p in parser.paths):
            raise InvalidArgument(
                "patterns must be 1-1024 characters, at most 16", field=f"config.parsers[{i}].paths"
            )
    if len(config.commands) > MAX_COMMANDS:
        raise InvalidArgument(f"at most {MAX_COMMANDS}", field="config.commands")
    allowed_set = set(allowed)
    if len(config.proxies) > MAX_PROXIES or len({p.kind for p in config.proxies}) < len(config.proxies):
        raise InvalidArgument("at most one of each proxy", field="config.proxies")
    for i, proxy in enumerate(config.proxies):
        if not timedelta(0) < proxy.timeout <= MAX_TIMEOUT:
            raise InvalidArgument(
                f"must be above 0 and at most {MAX_TIMEOUT}", field=f"config.proxies[{i}].timeout"
            )
        if proxy.kind not in allowed_set:
            raise InvalidArgument(
                f"{proxy.kind} is not on this server's allow-list "
                f"({', '.join(sorted(allowed_set)) or 'empty'}; see `serve --validator-allow {proxy.kind}`)",
                field=f"config.proxies[{i}].kind",
            )
    for i, command in enumerate(config.commands):
        where = f"config.commands[{i}]"
        if not command.argv or not command.argv[0]:
            raise InvalidArgument("needs a program to run", field=f"{where}.argv")
        if len(command.argv) > MAX_ARGV or any(len(a) > 4096 or "\x00" in a for a in command.argv):
            raise InvalidArgument(f"at most {MAX_ARGV} arguments of 4096 characters", field=f"{where}.argv")
        if len(command.name) > 63:
            raise InvalidArgument("at most 63 characters", field=f"{where}.name")
        if not timedelta(0) < command.timeout <= MAX_TIMEOUT:
            raise InvalidArgument(f"must be above 0 and at most {MAX_TIMEOUT}", field=f"{where}.timeout")
        if not program_allowed(command.argv[0], allowed_set):
            raise InvalidArgument(
                f"program {command.argv[0]!r} is not on this server's allow-list "
                f"({', '.join(sorted(allowed_set)) or 'empty'}; see `serve --validator-allow`)",
                field=f"{where}.argv",
            )
    return config


def program_allowed(program: str, allowed: set[str]) -> bool:
    """`nginx` is allowed by `nginx` or by its absolute path; a path only by itself."""
    return program in allowed or (shutil.which(program) or "\x00") in allowed


def matches(path: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


@dataclass
class ParseCache:
    """Each file parsed at most once per format, shared by validators and the structure.

    A KDL file's result is its `kdl_config.FileFacts` (the `document`), read by `kdl`'s
    worker processes (the server's: ckdl holds the GIL, see `kdl_pool`), or in this
    process when there is none (unit tests, the benchmark). `get` blocks: call it from a
    thread, as the pipeline does."""

    root: Path
    kdl: KdlParsers | None = None
    results: dict[tuple[str, ConfigFormat], Parsed] = field(default_factory=dict)

    def get(self, path: str, fmt: ConfigFormat) -> Parsed:
        key = (path, ConfigFormat.KDL if fmt is ConfigFormat.ZENTINEL else fmt)
        if key not in self.results:
            self.results[key] = self._parse(path, key[1])
        return self.results[key]

    def _parse(self, path: str, fmt: ConfigFormat) -> Parsed:
        if fmt is not ConfigFormat.KDL:
            return parse(self.root, path, fmt)
        if self.kdl is None:
            return kdl_config.read(self.root, path)
        try:
            return self.kdl.parse(self.root, path)
        except KdlParsersClosed:
            # Not the file's fault: the push is refused, not stored as FAILED.
            raise Unavailable("the server is shutting down; retry", retry_after_ms=5000) from None


def run_parser(check: ParserCheck, main: str, manifest: Manifest, cache: ParseCache) -> ValidationResult:
    started = time.monotonic()
    patterns = check.patterns(main)
    paths = [e.path for e in manifest.files if matches(e.path, patterns)]
    results = [cache.get(p, check.format) for p in paths]
    errors = [r.error for r in results if not r.ok]
    if check.format is ConfigFormat.ZENTINEL and not errors:
        if not paths:
            errors.append(f"no file matches {', '.join(patterns)}")
        else:
            errors.extend(kdl_config.zentinel_errors(r.document for r in results))
    output = "\n".join(errors) if errors else f"{len(paths)} file(s) parsed"
    return ValidationResult(
        check.label(main), not errors, cap_output(output), timedelta(seconds=time.monotonic() - started)
    )


def structure(manifest: Manifest, cache: ParseCache) -> kdl_config.Structure:
    """What every KDL file of the bundle declares. A file that does not parse is listed
    under `unparsed` with why, never silently left out: risk then says it cannot judge
    it (whether or not the project validates KDL)."""
    files: list[kdl_config.FileFacts] = []
    unparsed: dict[str, str] = {}
    for entry in manifest.files:
        if entry.path.endswith(".kdl"):
            parsed = cache.get(entry.path, ConfigFormat.KDL)
            if parsed.ok:
                files.append(parsed.document)
            else:
                unparsed[entry.path] = parsed.error[:500]
    out = kdl_config.merge(files)
    out["unparsed"] = unparsed
    return out


def cap_output(text: str) -> str:
    if len(text) <= MAX_OUTPUT:
        return text
    return "...(cut)...\n" + text[-MAX_OUTPUT:]


async def run_command(check: CommandCheck, root: Path, main: str, allowed: set[str]) -> ValidationResult:
    """Run one external validator in `root` with a scrubbed environment and a timeout."""
    started = time.monotonic()

    def result(ok: bool, output: str) -> ValidationResult:
        elapsed = timedelta(seconds=time.monotonic() - started)
        return ValidationResult(check.label, ok, cap_output(output), elapsed)

    program = check.argv[0]
    if not program_allowed(program, allowed):
        return result(
            False, f"program {program!r} is not on this server's allow-list (serve --validator-allow)"
        )
    root = await in_thread(root.absolute)
    missing = await in_thread(_missing_input, check, root, main)
    if missing:
        return result(False, f"the command cannot find its input, so it was not run: {missing}")
    main_path = str(root / main) if main else ""
    argv = [a.replace("{path}", str(root)).replace("{main}", main_path) for a in check.argv]
    env = environment(root, BUNDLE_DIR=str(root), BUNDLE_MAIN=main_path)
    # Started as `controlplane.proxies.run` starts a proxy's validator: never by a fork of
    # this process (it runs gRPC, whose fork handlers crash a forked child now and then).
    try:
        child = await Child.start(argv, cwd=root, env=env)
    except FileNotFoundError:
        return result(False, f"command not found: {program!r} is not installed on the control plane's PATH")
    except OSError as e:
        return result(False, f"could not start {program!r}: {e.strerror}")
    output = bytearray()
    reader = asyncio.get_running_loop().create_task(_collect(child.output, output))
    try:
        code = await asyncio.wait_for(child.wait(), check.timeout.total_seconds())
    except TimeoutError:
        await child.stop()
        await _finish(reader, child)
        return result(
            False,
            f"timed out after {check.timeout.total_seconds():g}s and was killed; output:\n{_text(output)}",
        )
    finally:
        if child.returncode is None:  # cancelled (the push went away): nothing is reported
            child.kill()
            reader.cancel()  # a process outside the group may hold the pipe open
            child.close_pipe()
            await child.wait()
    child.kill()  # anything it left running in its group
    await _finish(reader, child)
    if code != 0:
        how = f"exited with code {code}" if code > 0 else f"was killed by signal {-code}"
        return result(False, f"{' '.join(argv)} {how}:\n{_text(output)}")
    return result(True, _text(output) or "exit 0")


def environment(root: Path, **extra: str) -> dict[str, str]:
    """What a validator's process gets: nothing of the server's environment (its keys,
    database URL) reaches it."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root), "LANG": "C.UTF-8", **extra}


def _missing_input(check: CommandCheck, root: Path, main: str) -> str:
    """Why the command's input is not there ('' when it is): the scratch tree, and the
    main file when the command names `{main}`."""
    if not root.is_dir():
        return f"the bundle directory {root} does not exist"
    if any("{main}" in a for a in check.argv):
        if not main:
            return "it names {main}, and the project's validation sets no main file (--main)"
        if not (root / main).is_file():
            return f"it names {{main}}, and the main file {main!r} is not in the bundle"
    return ""


async def _collect(stream: asyncio.StreamReader, out: bytearray) -> None:
    """Keep the last MAX_OUTPUT bytes, whatever the command prints."""
    while chunk := await stream.read(64 * 1024):
        out.extend(chunk)
        if len(out) > 2 * MAX_OUTPUT:
            del out[: len(out) - MAX_OUTPUT]


async def _finish(reader: asyncio.Task[None], child: Child) -> None:
    try:
        await asyncio.wait_for(reader, 2.0)
    except TimeoutError:
        reader.cancel()
    child.close_pipe()


def _text(output: bytearray) -> str:
    return output[-MAX_OUTPUT:].decode(errors="replace").strip()
