"""Tables, one module per area, all on one MetaData. Migrations in `migrations/` create
exactly these (tests/integration/test_migrations.py compares them)."""

from controlplane.store.schema.audit import audit_head, audit_log
from controlplane.store.schema.base import Json, UTCDateTime, metadata
from controlplane.store.schema.bundles import (
    bundle_details,
    bundle_signatures,
    signing_key_endorsements,
    signing_keys,
    validation_configs,
)
from controlplane.store.schema.core import (
    bundles,
    desired_state_log,
    enrollment_tokens,
    epochs,
    node_heartbeats,
    node_labels,
    node_xds,
    nodes,
    projects,
    revision_counter,
    routers,
    server_meta,
)
from controlplane.store.schema.identity import api_key_grants, api_keys
from controlplane.store.schema.notify import notification_channels, notification_events, notification_messages
from controlplane.store.schema.rollouts import (
    drift_events,
    drift_settings,
    freeze_windows,
    leases,
    rollout_approvals,
    rollout_claims,
    rollout_events,
    rollout_nodes,
    rollout_steps,
    rollouts,
)

__all__ = [
    "Json",
    "UTCDateTime",
    "api_key_grants",
    "api_keys",
    "audit_head",
    "audit_log",
    "bundle_details",
    "bundle_signatures",
    "bundles",
    "desired_state_log",
    "drift_events",
    "drift_settings",
    "enrollment_tokens",
    "epochs",
    "freeze_windows",
    "leases",
    "metadata",
    "node_heartbeats",
    "node_labels",
    "node_xds",
    "nodes",
    "notification_channels",
    "notification_events",
    "notification_messages",
    "projects",
    "revision_counter",
    "rollout_approvals",
    "rollout_claims",
    "rollout_events",
    "rollout_nodes",
    "rollout_steps",
    "rollouts",
    "routers",
    "server_meta",
    "signing_key_endorsements",
    "signing_keys",
    "validation_configs",
]
