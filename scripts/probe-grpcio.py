#!/usr/bin/env python3
"""probe-grpcio.py HOST:PORT [--sizes 8,64,...] [--ops N] [--json FILE]

Latency per value size, measured with a gRPC client nobody on the project wrote: Python's
grpcio, with stubs generated at run time from proto/waxos.proto by grpcio-tools. One client,
one connection, requests back to back: for each size, N PUTs of a value of that size, then N
linearizable GETs of it. Prints p50/p90/max per size and operation; with --json appends one
JSON line per (size, op). This is the probe that first showed the 44 ms Nagle/delayed-ACK
stall at 300 B-8 KB, which the project's own client and 100-byte benchmarks had hidden.
"""
import argparse
import importlib
import json
import os
import random
import statistics
import sys
import tempfile
import time

DEFAULT_SIZES = [8, 64, 100, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536, 262144, 1048576]


def stubs():
    """Generates waxos_pb2 / waxos_pb2_grpc from the repository's .proto into a temp dir."""
    from grpc_tools import protoc

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto")
    out = tempfile.mkdtemp(prefix="waxos-probe-")
    code = protoc.main(["protoc", f"-I{root}", f"--python_out={out}", f"--grpc_python_out={out}",
                        os.path.join(root, "waxos.proto")])
    if code != 0:
        sys.exit(f"probe: protoc failed on {root}/waxos.proto")
    sys.path.insert(0, out)
    return importlib.import_module("waxos_pb2"), importlib.import_module("waxos_pb2_grpc")


def human(n):
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", help="HOST:PORT of a waxos host (the leader, for the lowest latency)")
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    ap.add_argument("--ops", type=int, default=50, help="requests per size and operation")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    ap.add_argument("--json", help="append one JSON line per (size, op) to this file")
    ap.add_argument("--cacert", help="CA certificate (PEM): TLS, verifying the server (default: plaintext)")
    ap.add_argument("--cert", help="client certificate (PEM), with --key")
    ap.add_argument("--key", help="private key of --cert (PEM)")
    args = ap.parse_args()
    import grpc

    pb2, pb2_grpc = stubs()
    opts = [("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)]
    if args.cacert:
        read = lambda path: open(path, "rb").read() if path else None
        creds = grpc.ssl_channel_credentials(read(args.cacert), read(args.key), read(args.cert))
        channel = grpc.secure_channel(args.target, creds, options=opts)
    else:
        channel = grpc.insecure_channel(args.target, options=opts)
    grpc.channel_ready_future(channel).result(timeout=args.timeout)
    kv = pb2_grpc.KeyValueStub(channel)
    client_id = random.getrandbits(63) | 1
    seq = 0
    print(f"{'value':>9} {'op':>4} {'p50_ms':>8} {'p90_ms':>8} {'max_ms':>8}  (python grpcio {grpc.__version__}, "
          f"{args.ops} ops each, one connection to {args.target})")
    for size in [int(s) for s in args.sizes.split(",") if s]:
        value = os.urandom(size)
        key = f"probe:{size}"
        for op in ("put", "get"):
            lat = []
            for _ in range(args.ops):
                seq += 1
                t = time.perf_counter()
                if op == "put":
                    kv.Put(pb2.PutRequest(key=key, value=value, client_id=client_id, seq=seq), timeout=args.timeout)
                else:
                    r = kv.Get(pb2.GetRequest(key=key, client_id=client_id, seq=seq), timeout=args.timeout)
                    if not r.found or r.value != value:
                        sys.exit(f"probe: GET {key} returned {'a different value' if r.found else 'not found'}")
                lat.append((time.perf_counter() - t) * 1000)
            lat.sort()
            p50, p90 = statistics.median(lat), lat[int(len(lat) * 0.9) - 1]
            print(f"{human(size):>9} {op:>4} {p50:8.2f} {p90:8.2f} {lat[-1]:8.2f}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"client": "python-grpcio", "op": op, "value_bytes": size, "p50_ms": p50,
                                        "p90_ms": p90, "max_ms": lat[-1]}) + "\n")


if __name__ == "__main__":
    main()
