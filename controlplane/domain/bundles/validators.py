"""Per-project validation: built-in parsers and external commands.

A project's `ValidationConfig` names its entry point (`main`), the parsers run on files
matching glob patterns (KDL, JSON, YAML, or ZENTINEL = KDL plus Zentinel's structure)
and the external commands (`nginx -t -c {main}`, `zentinel validate --config {main}`)
run on the received files. A project without one gets `DEFAULT`: JSON and YAML syntax
by extension; KDL checks (which read KDL 2.0 and 1.0) are opt-in, so a project whose
`.kdl` files are some other dialect does not fail by default. External commands are an
admin's choice of program, run on the control plane's host, so the server only runs
programs on its allow-list (`serve --validator-allow`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import shutil
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from controlplane.domain.bundles.archive import kdl_config
from controlplane.domain.bundles.archive.formats import EXTENSIONS, ConfigFormat, Parsed, parse
from controlplane.domain.bundles.archive.kdl_pool import KdlParsers, KdlParsersClosed
from controlplane.domain.bundles.archive.manifest import Manifest
from controlplane.domain.kernel.errors import InvalidArgument, Unavailable
from controlplane.domain.model.bundles import ValidationResult

DEFAULT_TIMEOUT = timedelta(seconds=30)
# A validator that needs more than ten minutes is not a validator; it also holds a
# pipeline slot that long.
MAX_TIMEOUT = timedelta(minutes=10)
MAX_PARSERS = 16
MAX_COMMANDS = 8
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
class ValidationConfig:
    main: str = ""
    parsers: tuple[ParserCheck, ...] = ()
    commands: tuple[CommandCheck, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "main": self.main,
            "parsers": [{"format": p.format.value, "paths": list(p.paths)} for p in self.parsers],
            "commands": [
                {"name": c.name, "argv": list(c.argv), "timeout": c.timeout.total_seconds()}
                for c in self.commands
            ],
        }

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
        )


DEFAULT = ValidationConfig(parsers=(ParserCheck(ConfigFormat.JSON), ParserCheck(ConfigFormat.YAML)))
# What a Zentinel project typically sets (tests and the benchmark use it).
KDL_SYNTAX = ParserCheck(ConfigFormat.KDL)


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
        check.label(main), not errors, _cap(output), timedelta(seconds=time.monotonic() - started)
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


def _cap(text: str) -> str:
    if len(text) <= MAX_OUTPUT:
        return text
    return "...(cut)...\n" + text[-MAX_OUTPUT:]


async def run_command(check: CommandCheck, root: Path, main: str, allowed: set[str]) -> ValidationResult:
    """Run one external validator in `root` with a scrubbed environment and a timeout."""
    started = time.monotonic()

    def result(ok: bool, output: str) -> ValidationResult:
        return ValidationResult(check.label, ok, _cap(output), timedelta(seconds=time.monotonic() - started))

    program = check.argv[0]
    if not program_allowed(program, allowed):
        return result(
            False, f"program {program!r} is not on this server's allow-list (serve --validator-allow)"
        )
    main_path = str(root / main) if main else ""
    argv = [a.replace("{path}", str(root)).replace("{main}", main_path) for a in check.argv]
    # Nothing of the server's environment (its keys, database URL) reaches the command.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root),
        "LANG": "C.UTF-8",
        "BUNDLE_DIR": str(root),
        "BUNDLE_MAIN": main_path,
    }
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=root,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except FileNotFoundError:
        return result(False, f"command not found: {program!r} is not installed on the control plane's PATH")
    except OSError as e:
        return result(False, f"could not start {program!r}: {e.strerror}")
    assert proc.stdout is not None
    output = bytearray()
    reader = asyncio.get_running_loop().create_task(_collect(proc.stdout, output))
    try:
        code = await asyncio.wait_for(proc.wait(), check.timeout.total_seconds())
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        await _finish(reader)
        return result(
            False,
            f"timed out after {check.timeout.total_seconds():g}s and was killed; output:\n{_text(output)}",
        )
    finally:
        if proc.returncode is None:  # cancelled (the push went away): nothing is reported
            _kill_group(proc.pid)
            reader.cancel()  # a process outside the group may hold the pipe open
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
    _kill_group(proc.pid)  # anything it left running in its group
    await _finish(reader)
    if code != 0:
        how = f"exited with code {code}" if code > 0 else f"was killed by signal {-code}"
        return result(False, f"{' '.join(argv)} {how}:\n{_text(output)}")
    return result(True, _text(output) or "exit 0")


async def _collect(stream: asyncio.StreamReader, out: bytearray) -> None:
    """Keep the last MAX_OUTPUT bytes, whatever the command prints."""
    while chunk := await stream.read(64 * 1024):
        out.extend(chunk)
        if len(out) > 2 * MAX_OUTPUT:
            del out[: len(out) - MAX_OUTPUT]


async def _finish(reader: asyncio.Task[None]) -> None:
    try:
        await asyncio.wait_for(reader, 2.0)
    except TimeoutError:
        reader.cancel()


def _text(output: bytearray) -> str:
    return output[-MAX_OUTPUT:].decode(errors="replace").strip()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
