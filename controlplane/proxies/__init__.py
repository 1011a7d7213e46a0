"""What the control plane knows about the proxies it drives: nginx, HAProxy and Envoy.

Shared by the agent (its drivers) and, later, the server (validators, xDS), so it imports
nothing of the control plane but the generated API and no library outside the standard
library: the agent must stay installable without the server's stack (pyproject's
import-linter contracts hold it to that).

- `binaries`: where each proxy's binary is and which version it is.
- `run`: running a proxy's command with a timeout and bounded output.
- `validate`: the proxy's own validator against a tree; its words become a bounded reason.
- `nginx`, `haproxy`, `envoy`: the small main configuration each proxy is run from
  (it includes the bundle and adds a status endpoint, a log format), and readers of the
  proxy's own statistics.
- `window`: request rate, 5xx rate and p99 between two readings of a proxy's counters.
- `http`: a bounded HTTP GET on loopback, for status endpoints and admin APIs.
"""

from __future__ import annotations

from typing import Literal

ProxyKind = Literal["nginx", "haproxy", "envoy"]
KINDS: tuple[ProxyKind, ...] = ("nginx", "haproxy", "envoy")
