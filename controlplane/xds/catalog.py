"""Envoy's v3 message types, loaded into protobuf's default pool on first use.

A resource's `typed_config` may name any of Envoy's several hundred extension types.
Parsing it needs the type's descriptor, which only importing its generated module
registers, and a type URL does not say which module that is. So the first parse imports
every Envoy, xds and udpa module `xds-protos` ships (about a second and 25 MiB, once per
process); serving resources never needs this: it only handles their bytes.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import threading

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message

log = logging.getLogger(__name__)

# Top-level packages of xds-protos whose messages may appear in Envoy resources. The
# others it ships (google, opencensus, opentelemetry, cel, test) are not Envoy's API.
_PACKAGES = ("envoy/", "xds/", "udpa/", "validate/")
_lock = threading.Lock()


@functools.cache
def _load() -> int:
    loaded = 0
    dist = importlib.metadata.distribution("xds-protos")
    for entry in dist.files or ():
        path = str(entry)
        if not path.endswith("_pb2.py") or not path.startswith(_PACKAGES):
            continue
        try:
            importlib.import_module(path[:-3].replace("/", "."))
            loaded += 1
        except Exception:  # one broken module must not hide all the others
            log.warning("could not load Envoy API module %s", path, exc_info=True)
    return loaded


def load() -> int:
    """Import every Envoy API module once; the number of modules loaded."""
    with _lock:
        return _load()


def message_class(full_name: str) -> type[Message] | None:
    """The generated class of `full_name` (`envoy.config.cluster.v3.Cluster`), or None."""
    load()
    try:
        desc = descriptor_pool.Default().FindMessageTypeByName(full_name)
    except KeyError:
        return None
    return message_factory.GetMessageClass(desc)
