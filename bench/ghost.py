#!/usr/bin/env python3
"""Ghost time: how long after a node is SIGKILLed its presence members are gone.

Starts redis-server or nats-server on a free port and three release roomcast nodes with
their default configuration (node_timeout_ms 10000, heartbeat_ms 1000) unless ROOMCAST_*
variables say otherwise. N members join a room on node 2, a watcher on node 0 sees them
join; node 2 is SIGKILLed and the watcher's `leave` pushes are timed. Prints the time from
the kill to the first and to the last `leave`, and checks each member left exactly once.

    python3 bench/ghost.py --broker redis --members 50
    python3 bench/ghost.py --broker nats

Needs `pip install websockets`, redis-server / nats-server on PATH and
`cargo build --release --bin roomcast`. Everything started is stopped on exit.
"""
import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import websockets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(kind, procs, tmp):
    port = free_port()
    if kind == "redis":
        cmd = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
        url = f"redis://127.0.0.1:{port}"
    else:
        cmd = ["nats-server", "-p", str(port), "-js", "-sd", tmp]
        url = f"nats://127.0.0.1:{port}"
    procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return url
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{kind} did not start")


def start_node(binary, broker, procs):
    env = {k: v for k, v in os.environ.items()}
    env.update({"ROOMCAST_LISTEN": "127.0.0.1:0", "ROOMCAST_BROKER": broker, "ROOMCAST_LOG": "warn"})
    p = subprocess.Popen([binary], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(p)
    line = p.stdout.readline()
    if not line.startswith("roomcast listening on "):
        sys.exit(f"node did not start: {line!r}")
    return p, line.split()[3]


async def member(url, room):
    ws = await websockets.connect(url, subprotocols=["roomcast.v1.json"])
    await ws.send(json.dumps({"type": "connect", "id": 1}))
    await ws.send(json.dumps({"type": "subscribe", "id": 2, "room": room}))
    client = None
    while True:
        for m in (await ws.recv()).split("\n"):
            m = json.loads(m)
            if m.get("type") == "connected":
                client = m["client"]
            if m.get("type") == "subscribed":
                return ws, client


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--broker", choices=["redis", "nats"], default="redis")
    ap.add_argument("--members", type=int, default=50)
    args = ap.parse_args()
    binary = os.environ.get("BENCH_ROOMCAST_BIN", os.path.join(ROOT, "target/release/roomcast"))
    if not os.path.exists(binary):
        sys.exit(f"{binary} missing: cargo build --release --bin roomcast")
    procs, tmp = [], tempfile.mkdtemp()
    try:
        broker = start_broker(args.broker, procs, tmp)
        nodes = [start_node(binary, broker, procs) for _ in range(3)]
        room = f"ghosts{int(time.time())}"
        watcher, _ = await member(nodes[0][1], room)
        members = [await member(nodes[2][1], room) for _ in range(args.members)]
        want = {c for _, c in members}
        joined = set()
        while joined != want:
            for m in (await asyncio.wait_for(watcher.recv(), 30)).split("\n"):
                m = json.loads(m)
                if m.get("type") == "join":
                    joined.add(m["member"]["client"])
        killed = time.time()
        nodes[2][0].send_signal(signal.SIGKILL)
        left, first = {}, None
        deadline = killed + 60
        while set(left) != want and time.time() < deadline:
            for m in (await asyncio.wait_for(watcher.recv(), deadline - time.time())).split("\n"):
                m = json.loads(m)
                if m.get("type") == "leave":
                    c = m["member"]["client"]
                    left[c] = left.get(c, 0) + 1
                    first = first or time.time()
        last = time.time()
        # A few more reaping rounds: no second leave.
        try:
            while True:
                for m in (await asyncio.wait_for(watcher.recv(), 3)).split("\n"):
                    m = json.loads(m)
                    if m.get("type") == "leave":
                        left[m["member"]["client"]] = left.get(m["member"]["client"], 0) + 1
        except asyncio.TimeoutError:
            pass
        once = all(n == 1 for n in left.values()) and set(left) == want
        print(
            f"{args.broker}: {args.members} members of a SIGKILLed node; leaves "
            f"first {first - killed:.2f} s, last {last - killed:.2f} s after the kill; "
            f"each exactly once: {once}"
        )
        return 0 if once else 1
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
