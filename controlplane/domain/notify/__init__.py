"""Notifications (docs/notifications.md): channels and their management
(`channels.py`), and the worker that turns the outbox into messages and delivers them
under a lease (`worker.py`). Events are written by whoever causes them, in their own
transaction, through `Tx.notify.emit`."""
