from __future__ import annotations

import grpc

from controlplane.api.bundle.v1 import signing_pb2, signing_pb2_grpc
from controlplane.domain.bundles.keys import KeyDirectory
from controlplane.rpc import auth
from controlplane.rpc.bundle_convert import signing_key_out


class SigningKeyServicer(signing_pb2_grpc.SigningKeyServiceServicer):
    def __init__(self, keys: KeyDirectory):
        self._keys = keys

    async def ListSigningKeys(
        self, request: signing_pb2.ListSigningKeysRequest, context: grpc.aio.ServicerContext
    ) -> signing_pb2.ListSigningKeysResponse:
        if request.project:
            auth.require_project(request.project)
        # Only keys this server can prove (domain/bundles/key_trust.py): agents pin what this
        # lists at first contact, and a row in the database proves nothing.
        keys = await self._keys.trusted()
        signing = self._keys.signer.key_id
        return signing_pb2.ListSigningKeysResponse(keys=[signing_key_out(k, signing) for k in keys])

    async def RetireSigningKey(
        self, request: signing_pb2.RetireSigningKeyRequest, context: grpc.aio.ServicerContext
    ) -> signing_pb2.RetireSigningKeyResponse:
        key, _ = await self._keys.retire(request.signing_key_id)
        return signing_pb2.RetireSigningKeyResponse(key=signing_key_out(key, self._keys.signer.key_id))
