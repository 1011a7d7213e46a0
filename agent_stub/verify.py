"""Proving a bundle is exactly what the control plane built and signed, before it runs.

Three checks, each refusing with a precise reason (a NACK; the running bundle stays):

1. Signature, before downloading: an Ed25519 signature over
   `b"controlplane.bundle.v1\\x00" + digest` by a trusted key that is not retired. No
   signature, an unknown key id, a retired key or a signature that does not verify is
   refused.
2. Bytes: the archive hashes to the signed digest (download.py).
3. Manifest, after unpacking: `.bundle/manifest.json` lists exactly the files and links
   on disk, with their sizes, sha256 and executable bits. The manifest and SBOM are then
   removed, so the bundle directory holds only the operator's files.

Which keys are trusted is never the control plane's say alone:

- `--trusted-keys FILE` (the server writes `<data-dir>/trusted-keys.json` at every start;
  `controlplane signing-keys list --json` prints the same; or `{"keys": [{"key_id",
  "public_key" (base64), "state"}]}`): only the keys in the file. The file is read again
  when it changes, so a rotation needs no restart.
- Without it, trust on first use: the keys the control plane lists at the first
  successful contact are pinned in `<state-dir>/trusted-keys.json`, and from then on a
  key it lists later is *not* trusted (a bundle signed by it is refused, naming the
  file to add it to).

Either way the control plane's list (`ListSigningKeys`) is read before each install and
can only take trust away: a key it lists as retired is retired here too, and stays so.
Every retirement the agent learns (from the listing, the operator's file or the pin
file) is written to `<state-dir>/retired-keys.json` before the check that needed it and
read back at start, so neither a restart, a listing that fails, a trusted-keys file that
still says "active" (the server rewrites its file only at `serve` start) nor a database
writer flipping the key back can un-retire it. A file can add keys, never revive one;
only an operator editing `retired-keys.json` by hand can.

This module is the agent's own: it imports nothing of the server (import-linter).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from agent_stub.errors import ApplyFailed, TransientFailure
from agent_stub.state import CorruptState, atomic_write

CONTEXT = b"controlplane.bundle.v1\x00"
META_DIR = ".bundle"
MANIFEST = f"{META_DIR}/manifest.json"
SBOM = f"{META_DIR}/sbom.cdx.json"
FORMAT = "controlplane.bundle/v1"
_READ = 1024 * 1024
# The manifest of 10,000 files is about 1.5 MB; anything much larger is not ours.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    public_key: bytes
    retired: bool = False


def key_id_of(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


def _key(item: dict[str, Any], where: str) -> TrustedKey:
    try:
        raw = item.get("public_key") or item.get("publicKey") or ""
        public = base64.b64decode(raw, validate=True)
        VerifyKey(public)
    except (binascii.Error, ValueError, TypeError) as e:
        raise ValueError(f"{where}: public_key is not a base64 Ed25519 key: {e}") from None
    key_id = str(item.get("key_id") or item.get("keyId") or key_id_of(public))
    if key_id != key_id_of(public):
        raise ValueError(f"{where}: key id {key_id} does not match its public key ({key_id_of(public)})")
    state = str(item.get("state", "active")).lower()
    return TrustedKey(key_id, public, retired="retired" in state)


def load_trusted_keys(path: Path) -> dict[str, TrustedKey]:
    """Read a trusted-keys file; ValueError says what is wrong with it."""
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read trusted keys from {path}: {e}") from None
    items = body.get("keys", []) if isinstance(body, dict) else body
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path} lists no keys")
    keys = [_key(item, f"{path} entry {i}") for i, item in enumerate(items)]
    return {k.key_id: k for k in keys}


# The trust-on-first-use pins, in the state dir.
PIN_FILE = "trusted-keys.json"
# Every retirement this agent ever learned, in the state dir (both modes).
RETIRED_FILE = "retired-keys.json"


def _keys_json(keys: dict[str, TrustedKey]) -> bytes:
    body = [
        {
            "key_id": k.key_id,
            "public_key": base64.b64encode(k.public_key).decode(),
            "state": "retired" if k.retired else "active",
        }
        for k in sorted(keys.values(), key=lambda k: k.key_id)
    ]
    return json.dumps({"keys": body}, indent=2).encode() + b"\n"


def _retired_in(state_dir: Path | None) -> Path | None:
    return state_dir / RETIRED_FILE if state_dir is not None else None


def _load_retired(path: Path | None) -> dict[str, TrustedKey]:
    """The retirements recorded in `path`: every key in it is retired, whatever it says.
    An unreadable record is not guessed around (it would revive keys): CorruptState."""
    if path is None or not path.exists():
        return {}
    try:
        keys = load_trusted_keys(path)
    except ValueError as e:
        raise CorruptState(
            f"{e}; it records the signing keys this agent saw retired: fix it (removing it "
            "forgets those retirements)"
        ) from None
    return {i: TrustedKey(k.key_id, k.public_key, True) for i, k in keys.items()}


class KeyRing:
    """The keys this node trusts: from a file the operator gave (`file`), or pinned at
    first contact in `pin_file`. The control plane's list can retire them, never add.
    Retirements are kept in `retired_file` (when given) and never undone."""

    def __init__(
        self,
        keys: dict[str, TrustedKey] | None = None,
        *,
        file: Path | None = None,
        pin_file: Path | None = None,
        retired_file: Path | None = None,
        fsync: bool = True,
    ):
        self.file = file
        self.pin_file = pin_file
        self.retired_file = retired_file
        self.fsync = fsync
        self._file_stamp: tuple[int, int] | None = None
        self._retired: dict[str, TrustedKey] = _load_retired(retired_file)
        self.keys: dict[str, TrustedKey] = {}
        self._learn(dict(keys or {}))

    @classmethod
    def from_file(cls, path: Path, state_dir: Path | None = None, fsync: bool = True) -> KeyRing:
        """The keys of an operator's trusted-keys file (ValueError if it is unusable),
        minus those `state_dir` recorded as retired."""
        ring = cls(file=path, retired_file=_retired_in(state_dir), fsync=fsync)
        ring.reload()
        return ring

    @classmethod
    def pinned_in(cls, state_dir: Path, fsync: bool = True) -> KeyRing:
        """Trust on first use: what `state_dir` pinned, or nothing yet."""
        pin = state_dir / PIN_FILE
        keys = load_trusted_keys(pin) if pin.exists() else None
        return cls(keys, pin_file=pin, retired_file=_retired_in(state_dir), fsync=fsync)

    @property
    def source(self) -> str:
        if self.file is not None:
            return f"from {self.file}"
        if self.pin_file is not None:
            return (
                f"pinned at first contact in {self.pin_file}; to trust another key, add it there "
                "or give the agent --trusted-keys"
            )
        return "given in-process"

    def reload(self) -> None:
        """Read the operator's file again if it changed since the last read."""
        if self.file is None:
            return
        try:
            st = self.file.stat()
        except OSError as e:
            raise ValueError(f"cannot read trusted keys from {self.file}: {e}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._file_stamp:
            return
        keys = load_trusted_keys(self.file)
        self._file_stamp = stamp
        self._learn(keys)

    def _learn(self, keys: dict[str, TrustedKey]) -> None:
        """Trust `keys`, less every key retired here before or marked retired in them."""
        self._retire([k for k in keys.values() if k.retired])
        self.keys = self._marked(keys)

    def _retire(self, keys: list[TrustedKey]) -> set[str]:
        """Record retirements durably (before any check relies on them); the new ids."""
        new = {k.key_id: k for k in keys if k.key_id not in self._retired}
        if new:
            self._retired.update(new)
            if self.retired_file is not None:
                atomic_write(self.retired_file, _keys_json(self._retired), fsync=self.fsync)
        return set(new)

    def _marked(self, keys: dict[str, TrustedKey]) -> dict[str, TrustedKey]:
        return {i: TrustedKey(k.key_id, k.public_key, i in self._retired) for i, k in keys.items()}

    def merge_server(self, listed: list[TrustedKey]) -> None:
        """What the control plane lists: its retirements are honoured; its keys are
        pinned only on first contact, and only without an operator's file."""
        newly_retired = self._retire([k for k in listed if k.retired])
        first_contact = self.file is None and self.pin_file is not None and not self.keys
        if first_contact:
            self.keys = {k.key_id: k for k in listed}
        self.keys = self._marked(self.keys)
        if self.pin_file is not None and (first_contact or newly_retired & set(self.keys)) and self.keys:
            atomic_write(self.pin_file, _keys_json(self.keys), fsync=self.fsync)

    def check(self, digest: str, signature: bytes, key_id: str) -> None:
        if not signature or not key_id:
            raise ApplyFailed(
                f"bundle {digest} is unsigned: this node runs only bundles signed by a trusted key"
            )
        key = self.keys.get(key_id)
        if key is None:
            trusted = ", ".join(sorted(self.keys)) or "none"
            raise ApplyFailed(
                f"bundle {digest} is signed by unknown key {key_id}: not one of this node's trusted keys "
                f"({trusted}; {self.source})"
            )
        if key.retired:
            raise ApplyFailed(f"bundle {digest} is signed by retired key {key_id}: it is trusted no more")
        try:
            VerifyKey(key.public_key).verify(CONTEXT + digest.encode("ascii"), signature)
        except (BadSignatureError, ValueError, TypeError):
            raise ApplyFailed(
                f"signature by key {key_id} does not verify for bundle {digest}: the signature or the "
                "digest was altered"
            ) from None


ListKeys = Callable[[], Awaitable[list[TrustedKey]]]


class BundleVerifier:
    def __init__(self, ring: KeyRing, list_keys: ListKeys | None = None):
        self.ring = ring
        self._list_keys = list_keys

    async def refresh(self) -> None:
        """Re-read the keys file and the control plane's list. A listing that fails is
        no reason to stop (with keys to check against): the ring still refuses every
        key it has recorded as retired, whatever the file says."""
        try:
            await asyncio.to_thread(self.ring.reload)
        except ValueError as e:
            # A half-written file during an edit: keep the keys read before, try again later.
            if not self.ring.keys:
                raise TransientFailure(str(e)) from None
        if self._list_keys is None:
            return
        try:
            listed = await self._list_keys()
        except TransientFailure:
            if not self.ring.keys:
                raise
            return
        await asyncio.to_thread(self.ring.merge_server, listed)

    async def check_signature(self, digest: str, signature: bytes, key_id: str) -> None:
        await self.refresh()
        self.ring.check(digest, signature, key_id)

    def check_tree(self, root: Path) -> None:
        """The unpacked files are exactly the manifest's; then drop `.bundle/`."""
        check_manifest(root)
        try:
            shutil.rmtree(root / META_DIR)
        except OSError as e:
            raise ApplyFailed(f"removing {META_DIR}/ from the bundle failed on this node: {e}") from None


def _manifest(root: Path) -> dict[str, dict[str, Any]]:
    path = root / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise ApplyFailed(f"manifest check failed: {MANIFEST} is missing from the bundle")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ApplyFailed(f"manifest check failed: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        body = json.loads(path.read_bytes())
        if body.get("format") != FORMAT:
            raise ValueError(f"format {body.get('format')!r} is not {FORMAT}")
        entries = {str(e["path"]): e for e in body["files"]}
        if len(entries) != len(body["files"]):
            raise ValueError("a path is listed twice")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ApplyFailed(f"manifest check failed: {MANIFEST} is malformed: {e}") from None
    if not (root / SBOM).is_file():
        raise ApplyFailed(f"manifest check failed: {SBOM} is missing from the bundle")
    return entries


def _on_disk(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == META_DIR or rel.startswith(META_DIR + os.sep):
            continue
        for name in (*filenames, *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))):
            path = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
            found[path] = Path(dirpath) / name
    found.pop(META_DIR, None)
    return found


def check_manifest(root: Path) -> None:
    entries = _manifest(root)
    disk = _on_disk(root)
    extra = sorted(set(disk) - set(entries))
    if extra:
        raise ApplyFailed(f"manifest check failed: {extra[0]!r} is in the bundle but not in the manifest")
    missing = sorted(set(entries) - set(disk))
    if missing:
        raise ApplyFailed(f"manifest check failed: the manifest lists {missing[0]!r} but the bundle lacks it")
    for path_name, entry in sorted(entries.items()):
        _check_entry(path_name, entry, disk[path_name])


def _check_entry(name: str, entry: dict[str, Any], path: Path) -> None:
    if "link" in entry:
        if not path.is_symlink() or os.readlink(path) != entry["link"]:
            raise ApplyFailed(
                f"manifest check failed: {name!r} is not the symlink to {entry['link']!r} it lists"
            )
        return
    if path.is_symlink() or not path.is_file():
        raise ApplyFailed(f"manifest check failed: {name!r} is not a regular file")
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_READ):
            digest.update(chunk)
            size += len(chunk)
    if size != entry.get("size"):
        raise ApplyFailed(
            f"manifest check failed: {name!r} is {size} bytes, the manifest says {entry.get('size')}"
        )
    if digest.hexdigest() != entry.get("sha256"):
        raise ApplyFailed(
            f"manifest check failed: {name!r} has sha256 {digest.hexdigest()}, "
            f"the manifest says {entry.get('sha256')}"
        )
    executable = bool(path.stat().st_mode & 0o111)
    if executable != (int(str(entry.get("mode", "0644")), 8) & 0o111 != 0):
        raise ApplyFailed(f"manifest check failed: {name!r} executable bit differs from the manifest")
