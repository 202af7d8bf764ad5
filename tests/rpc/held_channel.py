"""A grpcio client for tests/rpc.rs: one channel made (and authenticated by a first call) at
start, then one call per line on stdin, on that channel ("held") or on a new one ("fresh").
Prints "ok MILLISECONDS BYTES" per call; a failed call ends the script with its error.

Env: RPC_ADDR, RPC_TOKEN, RPC_PATH (the method), RPC_REQUEST_HEX (the encoded request)."""

import os
import sys
import time

import grpc

ADDR = os.environ["RPC_ADDR"]
PATH = os.environ["RPC_PATH"]
REQUEST = bytes.fromhex(os.environ["RPC_REQUEST_HEX"])
METADATA = (("authorization", "Bearer " + os.environ["RPC_TOKEN"]),)


def call(channel):
    # No serializers: the request and the answer are raw message bytes.
    started = time.monotonic()
    answer = channel.unary_unary(PATH)(REQUEST, metadata=METADATA, timeout=10)
    return (time.monotonic() - started) * 1000, len(answer)


held = grpc.insecure_channel(ADDR)
call(held)
print("ready", flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "held":
        ms, size = call(held)
    elif command == "fresh":
        with grpc.insecure_channel(ADDR) as channel:
            ms, size = call(channel)
    else:
        sys.exit(f"unknown command {command!r}")
    print(f"ok {ms:.1f} {size}", flush=True)
held.close()
