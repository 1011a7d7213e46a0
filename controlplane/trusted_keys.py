"""The trusted-keys file agents take as `--trusted-keys`: the JSON form of
`ListSigningKeysResponse` ({"keys": [...]}, base64 public keys, proto field names).
`serve` writes it into the data directory; `controlplane signing-keys list --json`
prints the same document. Uses only the generated API."""

from __future__ import annotations

import json
from collections.abc import Iterable

from google.protobuf import json_format

from controlplane.api.bundle.v1 import signing_pb2

FILE_NAME = "trusted-keys.json"


def keys_document(keys: Iterable[signing_pb2.SigningKey]) -> str:
    body = [json_format.MessageToDict(k, preserving_proto_field_name=True) for k in keys]
    return json.dumps({"keys": body}, indent=2)
