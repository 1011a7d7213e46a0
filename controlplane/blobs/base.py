"""Content-addressed blob storage for bundle archives.

Two backends pass the same contract (tests/integration/test_bundle_blobs.py): a local
directory (`local.py`, the embedded default) and S3 or anything speaking its API
(`s3.py`). Keys are `sha256/<first two hex digits>/<hex>`, under an optional prefix.
Nodes never talk to a backend: they download through the control plane.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator

from controlplane.domain.kernel.errors import BlobStoreUnavailable
from controlplane.domain.ports import BlobDigestMismatch

log = logging.getLogger(__name__)


@contextlib.contextmanager
def reported(
    failures: tuple[type[BaseException], ...], reason: Callable[[BaseException], str] = lambda _: ""
) -> Iterator[None]:
    """A backend's own failures (`failures`: a full disk, a refused bucket, an endpoint
    that does not answer) leave the store as BlobStoreUnavailable, in or out of a
    transaction, so they never pass for the database failing or reach a caller as
    INTERNAL. The caller's message names `reason(error)` or the errno; the log keeps the
    detail (paths, endpoints) that the message leaves out."""
    try:
        yield
    except failures as e:
        log.warning("the blob store failed", exc_info=e)
        raise BlobStoreUnavailable.of(e, reason(e)) from e


class DigestCheck:
    """Hashes bytes on their way into a store; `verify` refuses them unless they hash
    to the digest (so what is stored is exactly what was signed, whatever touched the
    file in between)."""

    def __init__(self, digest: str):
        self.digest = digest
        self._hash = hashlib.sha256()

    def update(self, data: bytes) -> bytes:
        self._hash.update(data)
        return data

    def verify(self) -> None:
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            raise BlobDigestMismatch(f"the bytes to store as {self.digest} hash to {actual}")


def blob_key(digest: str) -> str:
    algo, _, hexdigest = digest.partition(":")
    return f"{algo}/{hexdigest[:2]}/{hexdigest}"
