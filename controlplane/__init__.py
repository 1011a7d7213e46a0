"""Fleet control plane for reverse proxies."""

__version__ = "0.1.0"
