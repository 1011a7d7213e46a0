"""Tables, one module per area, all on one MetaData. Migrations in `migrations/` create
exactly these (tests/integration/test_migrations.py compares them)."""

from controlplane.store.schema.audit import audit_head, audit_log
from controlplane.store.schema.base import Json, UTCDateTime, metadata
from controlplane.store.schema.core import (
    bundles,
    desired_state_log,
    enrollment_tokens,
    node_heartbeats,
    node_labels,
    nodes,
    projects,
    revision_counter,
    server_meta,
)

__all__ = [
    "Json",
    "UTCDateTime",
    "audit_head",
    "audit_log",
    "bundles",
    "desired_state_log",
    "enrollment_tokens",
    "metadata",
    "node_heartbeats",
    "node_labels",
    "nodes",
    "projects",
    "revision_counter",
    "server_meta",
]
