"""An S3 endpoint over real HTTP: moto's server mode in a subprocess on a free port.

`moto_s3` (session-wide: one server for the run) yields the endpoint URL; `s3_bucket`
makes a fresh bucket per test and yields the settings a `S3BlobStore` or `serve
--blob-store` needs. Credentials are dummies moto accepts.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    bucket: str = ""

    def settings(self, prefix: str) -> dict[str, str]:
        """The server's settings for a blob store under `prefix` in this bucket."""
        return {
            "blob_store": f"s3://{self.bucket}/{prefix}",
            "s3_endpoint_url": self.url,
            "s3_region": REGION,
            "s3_access_key_id": ACCESS_KEY,
            "s3_secret_access_key": SECRET_KEY,
        }

    def env(self) -> dict[str, str]:
        """The standard AWS environment for a process using this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }


def _printed_url(log: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"Running on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"moto_server printed no address within {timeout}s")


def _wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers: up
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {url} within {timeout}s")


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    # The one installed with this interpreter first, whether or not its bin is on PATH.
    binary = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if binary is None:
        pytest.fail("moto_server is not installed (pip install -e '.[dev]')")
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        # Port 0: the server picks one and prints it (never "find a free port, then bind").
        proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", "0"], stdout=out, stderr=subprocess.STDOUT)
    url = _printed_url(log, proc)
    try:
        _wait_up(url, proc)
        yield S3Endpoint(url)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def client(endpoint: S3Endpoint) -> Any:
    """An aiobotocore S3 client of the endpoint with the test credentials (async with)."""
    return get_session().create_client(
        "s3",
        endpoint_url=endpoint.url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


async def new_bucket(endpoint: S3Endpoint) -> S3Endpoint:
    """A fresh, empty bucket on the endpoint."""
    bucket = f"bundles-{uuid.uuid4().hex[:12]}"
    async with client(endpoint) as s3:
        await s3.create_bucket(Bucket=bucket)
    return S3Endpoint(endpoint.url, bucket)


@pytest.fixture
async def s3_bucket(moto_s3: S3Endpoint) -> AsyncIterator[S3Endpoint]:
    yield await new_bucket(moto_s3)
