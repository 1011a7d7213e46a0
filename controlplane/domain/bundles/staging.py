"""An upload on its way in: written to a local temp file while hashing, so memory stays
bounded whatever the bundle size and the digest is known when the last byte lands."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from types import TracebackType


class UploadTooLarge(ValueError):
    pass


class StagedUpload:
    def __init__(self, directory: Path, max_bytes: int):
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix="upload-")
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._max = max_bytes
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max:
            raise UploadTooLarge(
                f"the uploaded archive passed the limit of {self._max} bytes (--max-bundle-bytes) "
                f"at byte {self.size}; refused, nothing kept"
            )
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self) -> str:
        """Close the file; returns the digest of everything written."""
        self._file.close()
        return f"sha256:{self._hash.hexdigest()}"

    def __enter__(self) -> StagedUpload:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
