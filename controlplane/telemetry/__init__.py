"""Logs and traces, set up once per process for the server and the agent alike
(logs.py, tracing.py). The agent imports this package: it depends on structlog and
OpenTelemetry only, never on the server."""
