"""Routers: nodes that route a selector's traffic, and the weights they apply.

An operator declares a node the router of a selector (`directory.py`). Its backends are
the selector's nodes at the addresses they registered; its desired state is the weight
of each, a routing table written to the desired-state log on the router's own
`route:<id>` key (`tables.py`) whenever what decides it changes: a rollout step that
moves traffic, a rollback, a node joining or leaving the selector, an assignment. The
weights come from the rollouts that move traffic (`shares.py`): a canary step's percent,
a blue-green step's weight. The router's driver applies the table and acknowledges its
revision like any desired state; a rollout step that moved weight waits for that
acknowledgement (docs/rollouts.md, "Routers").
"""
