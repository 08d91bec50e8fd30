#!/usr/bin/env python3
"""A third-party WebSocket client (the `websockets` package) against a roomcast node, with
permessage-deflate offered (websockets' default).

Usage: deflate_client.py WS_URL

Connects with subprotocol roomcast.v1.json, checks that the node accepted
permessage-deflate, sends connect, subscribe and a publish with a ~2 KB payload (which
websockets sends compressed), receives the publication back, and prints one JSON summary
line on stdout. Exits non-zero with a message on stderr on any failure.
"""

import asyncio
import json
import sys

try:
    import websockets
    from websockets.asyncio.client import connect
except ImportError as e:  # pragma: no cover - reported by the Rust test
    print(f"the python `websockets` package is missing ({e}): pip install websockets", file=sys.stderr)
    sys.exit(3)

TIMEOUT = 10


async def recv_until(ws, pred, seen):
    while True:
        frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
        if isinstance(frame, bytes):
            raise AssertionError("binary frame on a JSON connection")
        for line in frame.split("\n"):
            if not line.strip():
                continue
            msg = json.loads(line)
            seen.append(msg["type"])
            if pred(msg):
                return msg


async def main(url):
    async with connect(url, subprotocols=["roomcast.v1.json"], max_size=2**20) as ws:
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        if "permessage-deflate" not in extensions:
            raise AssertionError(f"permessage-deflate not negotiated: {extensions!r}")
        seen = []
        await ws.send(json.dumps({"type": "connect", "id": 1, "name": "py-websockets"}))
        connected = await recv_until(ws, lambda m: m.get("id") == 1, seen)
        assert connected["type"] == "connected", connected
        await ws.send(json.dumps({"type": "subscribe", "id": 2, "room": "py"}))
        sub = await recv_until(ws, lambda m: m.get("id") == 2, seen)
        assert sub["type"] == "subscribed", sub
        payload = {"text": "roomcast " * 200, "items": list(range(100))}
        await ws.send(json.dumps({"type": "publish", "id": 3, "room": "py", "data": payload}))
        # The node sends the reply first, then the publisher's own copy.
        published = await recv_until(ws, lambda m: m.get("id") == 3, seen)
        publication = await recv_until(ws, lambda m: m["type"] == "publication", seen)
        assert published["type"] == "published", published
        print(
            json.dumps(
                {
                    "websockets": websockets.__version__,
                    "extensions": extensions,
                    "subprotocol": ws.subprotocol,
                    "client": connected["client"],
                    "publication_offset": publication["offset"],
                    "published_offset": published["offset"],
                    "data_matches": publication["data"] == payload,
                    "payload_bytes": len(json.dumps(payload)),
                    "seen": seen,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: deflate_client.py WS_URL", file=sys.stderr)
        sys.exit(2)
    asyncio.run(main(sys.argv[1]))
