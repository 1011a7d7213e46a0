"""Rollouts: moving a selector's nodes to a bundle, step by step, safely.

`model` (records and state tables), `spec` (checking what an operator asked for),
`plan` (strategies → steps), `gates` and `canary` (health decisions), `machine` (the
state machine, pure), `commit` (writing a decision back in one transaction),
`controller` and `directory` (operator API), `driver` (the lease-holding loop), `bus`
and `watch` (WatchRollout), `bundles` (may this bundle be assigned?).
"""
