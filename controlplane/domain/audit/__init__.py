"""The audit trail: who is acting (`context`), the HMAC chain every mutation extends in
its own transaction (`chain`), and reading, exporting and verifying it (`trail`)."""
