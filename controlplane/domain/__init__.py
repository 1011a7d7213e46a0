"""The rules of the control plane. Imports no grpc and no SQL.

Packages, from the ground up; each imports only those below it (import-linter's
`layers` contract in pyproject.toml holds the order):

- `kernel`     errors, the clock, secrets, field checks, labels and selectors
- `model`      the records every concept exchanges: nodes, bundles, desired rows,
               credentials, rollouts, drift, audit entries, leases
- `ports`      what the domain needs from the outside world, as Protocols: the store
               and its repositories, the desired-state view, blob storage, the change feed
- `audit`      who is acting (request context), the HMAC chain, reading and verifying it
- `leases`     one holder at a time for background work, fenced by epoch
- `projects`   tenants and their rollout policy
- `desired`    the desired-state log's write path, its retention, and reading what
               decides nodes' desired state inside a transaction
- `identity`   roles, API keys, enrollment tokens, node credentials and node tokens
- `bundles`    the bundle pipeline, its archive format, validation, risk, signing and keys
- `routing`    routers: their declaration and the routing tables (weights) computed for them
- `fleet`      nodes, heartbeats, status reports, operator assignments
- `rollouts`   rollouts: plans, gates, the state machine, the driver
- `drift`      drift episodes and their remediation
"""
