#!/usr/bin/env python3
"""Publish into a roomcast room from a backend, over NATS (roomcast's backend API).

    pip install nats-py
    python3 publish.py --nats nats://127.0.0.1:4222 --room chat --text "deploy finished"

Every node serves `<prefix>.api.<method>` in one queue group, so any node answers. The
reply is `{"result": {...}}` or `{"error": {"code": ..., "message": ...}}`.
"""

import argparse
import asyncio
import json
import sys

import nats


async def call(nc, prefix, method, params, timeout=5.0):
    """One API call; returns `result`, raises on `error`."""
    msg = await nc.request(f"{prefix}.api.{method}", json.dumps(params).encode(), timeout=timeout)
    reply = json.loads(msg.data)
    if "error" in reply:
        err = reply["error"]
        raise RuntimeError(f"{method} failed: {err['code']} {err['message']}")
    return reply["result"]


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS server of the cluster")
    ap.add_argument("--prefix", default="roomcast", help="api.prefix of the nodes")
    ap.add_argument("--room", required=True)
    ap.add_argument("--text", default="hello from python")
    ap.add_argument("--key", help="idempotency_key: a retry with the same key publishes once")
    args = ap.parse_args()

    nc = await nats.connect(args.nats)
    try:
        params = {"room": args.room, "data": {"text": args.text}}
        if args.key:
            params["idempotency_key"] = args.key
        # With a key, retrying after a timeout is safe: the cluster publishes once.
        result = await call(nc, args.prefix, "publish", params)
        print(json.dumps({"published": result}), flush=True)

        # Fire and forget: no reply subject, carried out and not answered.
        await nc.publish(f"{args.prefix}.api.publish",
                         json.dumps({"room": args.room, "data": {"text": args.text, "fire": True}}).encode())
        await nc.flush()

        info = await call(nc, args.prefix, "info", {})
        print(json.dumps({"nodes": info["nodes"]}), flush=True)
    finally:
        await nc.drain()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # a clear one-line error for scripts
        print(f"publish.py: {e}", file=sys.stderr)
        sys.exit(1)
