"""The rules of the control plane. Imports no grpc and no SQL."""
