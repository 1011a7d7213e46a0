"""Bundles: immutable, content-addressed, signed archives of a proxy's configuration.

`registry` runs the pipeline (receive → hash → parse → pack → validate → risk → sign →
store) and answers whether a bundle may be assigned; `intake`, `staging` and `slots`
receive untrusted uploads within bounds; `archive` is the reproducible `.tar.zst`
format, its manifest and SBOM and the config parsers; `validators`, `risk` and `diff`
judge a bundle against the previous one; `signing` and `keys` hold the Ed25519 keys and
their rotation; `lifecycle` revokes and downloads; `gc` removes archives nobody needs.
"""
