// A Socket.IO 4 server that mirrors what the roomcast load scenarios use, for side-by-side
// benchmarks (bench/run.sh socketio-idle|socketio-fanout, loadgen --proto socketio):
//
//   join    (room, ack?)          joins a room; ack({room})
//   leave   (room, ack?)          leaves it; ack({room})
//   publish ({room, data}, ack?)  broadcasts `publication` {room, data} to the room's other
//                                 members (like roomcast's skip_self); ack({ok: true})
//
// WebSocket transport only (no long-polling), like the roomcast gateway.
//
//   node server.js [--host 127.0.0.1] [--port 0] [--deflate] [--redis redis://127.0.0.1:6379]
//
// Prints `socketio listening on ws://HOST:PORT/socket.io/?EIO=4&transport=websocket node=ID`
// once it accepts connections. With --redis, rooms are shared between processes through
// @socket.io/redis-adapter. SIGTERM or SIGINT closes every connection and exits.
"use strict";

const http = require("http");
const { Server } = require("socket.io");

function parseArgs(argv) {
  const opts = { host: "127.0.0.1", port: 0, deflate: false, redis: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--host") opts.host = value();
    else if (a === "--port") opts.port = Number(value());
    else if (a === "--deflate") opts.deflate = true;
    else if (a === "--redis") opts.redis = value();
    else throw new Error(`unknown argument ${a}`);
  }
  if (!Number.isInteger(opts.port) || opts.port < 0 || opts.port > 65535) {
    throw new Error("--port must be 0..65535");
  }
  return opts;
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const httpServer = http.createServer((req, res) => {
    res.writeHead(404, { "content-type": "text/plain" });
    res.end("not found\n");
  });
  const io = new Server(httpServer, {
    transports: ["websocket"],
    serveClient: false,
    // Same threshold as roomcast's compression_min_size.
    perMessageDeflate: opts.deflate ? { threshold: 256 } : false,
    pingInterval: 25000,
    pingTimeout: 20000,
    maxHttpBufferSize: 128 * 1024,
  });

  let redisClients = [];
  if (opts.redis) {
    const { createClient } = require("redis");
    const { createAdapter } = require("@socket.io/redis-adapter");
    const pub = createClient({ url: opts.redis });
    const sub = pub.duplicate();
    for (const c of [pub, sub]) c.on("error", (e) => console.error(`redis: ${e.message}`));
    await Promise.all([pub.connect(), sub.connect()]);
    io.adapter(createAdapter(pub, sub));
    redisClients = [pub, sub];
  }

  io.on("connection", (socket) => {
    socket.on("join", (room, ack) => {
      if (typeof room !== "string" || room.length === 0) {
        if (typeof ack === "function") ack({ error: "bad room" });
        return;
      }
      socket.join(room);
      if (typeof ack === "function") ack({ room });
    });
    socket.on("leave", (room, ack) => {
      socket.leave(room);
      if (typeof ack === "function") ack({ room });
    });
    socket.on("publish", (msg, ack) => {
      if (!msg || typeof msg.room !== "string") {
        if (typeof ack === "function") ack({ error: "bad request" });
        return;
      }
      // Encoded once for the whole room by the adapter.
      socket.to(msg.room).emit("publication", { room: msg.room, data: msg.data });
      if (typeof ack === "function") ack({ ok: true });
    });
  });

  await new Promise((resolve, reject) => {
    httpServer.once("error", reject);
    httpServer.listen(opts.port, opts.host, resolve);
  });
  const { address, port } = httpServer.address();
  const id = `socketio-${process.pid}`;
  console.log(`socketio listening on ws://${address}:${port}/socket.io/?EIO=4&transport=websocket node=${id}`);

  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    io.close(() => {
      Promise.allSettled(redisClients.map((c) => c.quit())).then(() => process.exit(0));
    });
    setTimeout(() => process.exit(0), 5000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((e) => {
  console.error(`socketio server: ${e.message}`);
  process.exit(1);
});
