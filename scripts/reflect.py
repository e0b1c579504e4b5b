#!/usr/bin/env python3
"""reflect.py HOST:PORT [--cacert CA] [--cert CERT --key KEY] (list | call SERVICE/METHOD [JSON])

A gRPC client that knows nothing of waxos: it learns the services and message types from the
host's gRPC reflection (no .proto, no generated stubs), the way grpcurl does, with Python's
grpcio and grpcio-reflection (`pip install grpcio grpcio-reflection`).

  list                         the services the host offers
  call SERVICE/METHOD [JSON]   one unary call; the request and the answer as JSON (proto3 JSON
                               mapping: bytes are base64)

  python3 scripts/reflect.py 127.0.0.1:50051 --cacert .cluster/pki/ca.pem list
  python3 scripts/reflect.py 127.0.0.1:50051 --cacert .cluster/pki/ca.pem call grpc.health.v1.Health/Check
  python3 scripts/reflect.py 127.0.0.1:50051 --cacert .cluster/pki/ca.pem \
      call waxos.v1.KeyValue/Put '{"key": "greeting", "value": "aGVsbG8="}'
"""
import argparse
import sys

try:
    import grpc
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
except ImportError:
    sys.exit("reflect.py needs grpcio and grpcio-reflection: pip install grpcio grpcio-reflection")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", help="HOST:PORT")
    ap.add_argument("--cacert", help="CA certificate (PEM): TLS, verifying the host (default: plaintext)")
    ap.add_argument("--cert", help="client certificate (PEM), with --key")
    ap.add_argument("--key", help="private key of --cert (PEM)")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds per call")
    ap.add_argument("command", choices=["list", "call"])
    ap.add_argument("method", nargs="?", help="SERVICE/METHOD, e.g. waxos.v1.KeyValue/Get")
    ap.add_argument("request", nargs="?", default="{}", help="the request as JSON")
    args = ap.parse_args()

    def read(path):
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    if args.cacert:
        creds = grpc.ssl_channel_credentials(read(args.cacert), read(args.key), read(args.cert))
        channel = grpc.secure_channel(args.target, creds)
    else:
        channel = grpc.insecure_channel(args.target)
    db = ProtoReflectionDescriptorDatabase(channel)
    if args.command == "list":
        for service in db.get_services():
            print(service)
        return
    if not args.method or "/" not in args.method:
        sys.exit("call needs SERVICE/METHOD, e.g. waxos.v1.KeyValue/Get")
    service_name, method_name = args.method.rsplit("/", 1)
    pool = descriptor_pool.DescriptorPool(db)
    try:
        method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
    except KeyError:
        sys.exit(f"the host offers no {args.method} (try: list)")
    if method.client_streaming or method.server_streaming:
        sys.exit(f"{args.method} streams: only unary calls here")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse(args.request, request_class())
    call = channel.unary_unary(
        f"/{service_name}/{method_name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    try:
        response = call(request, timeout=args.timeout)
    except grpc.RpcError as e:
        sys.exit(f"{args.method}: {e.code().name}: {e.details()}")
    print(json_format.MessageToJson(response, always_print_fields_with_no_presence=True, indent=None))


if __name__ == "__main__":
    main()
