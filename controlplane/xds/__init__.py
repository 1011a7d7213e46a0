"""Envoy fleets over xDS: what an xDS node receives and how it acknowledges it.

This package owns everything of the aggregated discovery service that does not need a
transport or a store:

- `types`: the resource types served (type URLs, make-before-break order);
- `resources`: a bundle directory of Envoy resources (YAML/JSON) parsed into v3 messages
  and checked (fields, references, cycles, sizes, no private keys), with `snapshot`
  giving the canonical bytes, versions and the per-resource diff;
- `sotw`, `delta` on top of `session`: one ADS stream's protocol state, pure: given the
  node's desired resources at a revision and the requests Envoy sends, which responses
  to send, what is acknowledged, and the node's status;
- `bootstrap`: the Envoy bootstrap a node starts with; `validate`: the
  real Envoy (`--mode validate`);
- `stats`: Envoy's own statistics (MetricsService) turned into heartbeat figures.

Only `controlplane/rpc/xds.py` knows grpc. docs/xds.md describes the protocol as served.
"""
