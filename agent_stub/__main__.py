"""`python -m agent_stub ...`; also the `agent-stub` console script."""

from __future__ import annotations

from agent_stub.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
