"""Calls the control plane makes to the outside world: metric queries (Prometheus's HTTP
API), and (issue 13) webhook gates and notifications. Every connection goes through
`guard.py`, which refuses loopback, link-local, metadata and other internal addresses
after DNS resolution unless the server's settings allow them."""
