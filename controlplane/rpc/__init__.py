"""gRPC transport: the only package that imports grpc. Servicers validate, convert,
call the domain and convert back."""
