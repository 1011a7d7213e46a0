"""The reference node agent.

It holds one long-lived `WatchBundles` stream, applies the desired bundle it is told
about (download, verify, unpack into a new directory, let the proxy's driver validate
it, swap the `current` symlink, have the proxy load it and confirm) and reports back,
with health and metrics from the proxy's own statistics. Of the server package it
imports only the generated API (`controlplane.api`) and the proxy knowledge shared with
the server (`controlplane.proxies`): the agent speaks the wire contract and nothing else.

Library use: build an `AgentConfig`, then `Agent(config, ...)` and `await agent.run()`.
"""

from __future__ import annotations

__version__ = "0.1.0"
