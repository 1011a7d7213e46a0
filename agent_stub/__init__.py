"""The reference node agent.

It holds one long-lived `WatchBundles` stream, applies the desired bundle it is told
about (download, verify, unpack into a new directory, run the apply hook, swap the
`current` symlink) and reports back. Only the generated API (`controlplane.api`) is
imported from the server package: the agent speaks the wire contract and nothing else.

Library use: build an `AgentConfig`, then `Agent(config, ...)` and `await agent.run()`.
"""

from __future__ import annotations

__version__ = "0.1.0"
