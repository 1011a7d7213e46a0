"""Who may call: API keys with per-project roles (`api_keys`), enrollment tokens
(`enrollment`), node credentials and their revocation (`node_credentials`) and the
short-lived Ed25519 node tokens they buy (`node_tokens`)."""
