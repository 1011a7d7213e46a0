"""The two ways applying a desired state can fail, and why the difference matters.

`ApplyFailed` is a NACK: the bundle itself is unusable on this node (integrity, hostile
archive, the apply hook refused it). Retrying the same bytes gives the same answer, so the
node reports FAILED, records it and parks until a newer revision comes.

`TransientFailure` is the network's fault (the download stream broke, the server is
restarting). Nothing is recorded: the stream is abandoned and the node resumes from its
cursor, which gets the same desired state again.
"""

from __future__ import annotations


class ApplyFailed(Exception):
    """The bundle is rejected; `reason` is what the node reports in its FAILED status."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TransientFailure(Exception):
    """A network or server-side hiccup: reconnect and resume, do not NACK."""

    def __init__(self, message: str, *, code: str = "", retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after
