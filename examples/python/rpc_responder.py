#!/usr/bin/env python3
"""Answer roomcast client `rpc` calls from a backend, over NATS.

    pip install nats-py
    python3 rpc_responder.py --nats nats://127.0.0.1:4222 --method get_profile

A client's `{"type":"rpc","method":"get_profile","data":{...}}` reaches this process as a
NATS request on `<prefix>.rpc.get_profile`, with headers `roomcast-client` and
`roomcast-user`; the body is the client's `data` (JSON here; MessagePack clients' calls
carry `content-type: application/msgpack`). Whatever this process answers becomes the
`data` of the client's `rpc` reply. Run several: they share a queue group.
"""

import argparse
import asyncio
import json
import signal

import nats


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nats", default="nats://127.0.0.1:4222")
    ap.add_argument("--prefix", default="roomcast")
    ap.add_argument("--method", default="get_profile")
    ap.add_argument("--count", type=int, default=0, help="exit after this many calls (0: run until stopped)")
    args = ap.parse_args()

    nc = await nats.connect(args.nats)
    done = asyncio.Event()
    served = 0

    async def answer(msg):
        nonlocal served
        headers = msg.headers or {}
        if headers.get("content-type") == "application/msgpack":
            # This example speaks JSON only; a real responder would decode MessagePack.
            await msg.respond(json.dumps({"error": "send JSON"}).encode())
        else:
            asked = json.loads(msg.data) if msg.data else None
            await msg.respond(json.dumps({
                "user": headers.get("roomcast-user", ""),
                "client": headers.get("roomcast-client", ""),
                "asked": asked,
                "name": "Bob",
                "status": "away",
            }).encode())
        served += 1
        if args.count and served >= args.count:
            done.set()

    await nc.subscribe(f"{args.prefix}.rpc.{args.method}", queue="profile-service", cb=answer)
    await nc.flush()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
