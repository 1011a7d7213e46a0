"""The records the domain's concepts exchange, with the invariants of their own fields
and no behaviour beyond that: projects and nodes (`fleet`), desired-state rows and how a
node's effective row is resolved (`desired`), bundles and signing keys, credentials and
roles, rollouts and what a rollout observes (`rollouts`, `facts`), drift, audit entries
and leases. Ports and every concept package build on them."""
