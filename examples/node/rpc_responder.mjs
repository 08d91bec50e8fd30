// Answer roomcast clients' `rpc` calls from a Node.js backend, over NATS.
//
//   npm install
//   node rpc_responder.mjs --nats nats://127.0.0.1:4222 [--method get_profile] [--count 0]
//
// A client's `{"type": "rpc", "method": "get_profile", "data": ...}` reaches
// `<prefix>.rpc.get_profile` with headers `roomcast-client` and `roomcast-user`; the body of
// the answer becomes the reply's `data`.
import { parseArgs } from "node:util";
import { connect, JSONCodec } from "nats";

const { values: args } = parseArgs({
  options: {
    nats: { type: "string", default: "nats://127.0.0.1:4222" },
    prefix: { type: "string", default: "roomcast" },
    method: { type: "string", default: "get_profile" },
    count: { type: "string", default: "0" }, // exit after this many calls (0: run until stopped)
  },
});
const jc = JSONCodec();
const count = Number.parseInt(args.count, 10);

const nc = await connect({ servers: args.nats });
// A queue group: run as many responders as needed, each call goes to one.
const sub = nc.subscribe(`${args.prefix}.rpc.${args.method}`, { queue: "profile-service" });
// A round trip to the server: the subscription is in place before we say we are ready.
await nc.flush();
console.log("ready");
let answered = 0;
for await (const m of sub) {
  const user = m.headers?.get("roomcast-user") ?? "";
  const client = m.headers?.get("roomcast-client") ?? "";
  // JSON clients' calls carry JSON; MessagePack ones `content-type: application/msgpack`
  // (decode those with a MessagePack library; this example answers JSON clients).
  let asked = null;
  try {
    asked = m.data.length ? jc.decode(m.data) : null;
  } catch {
    asked = { undecodable: m.data.length };
  }
  m.respond(jc.encode({ user, client, asked, name: "Bob", status: "away" }));
  answered += 1;
  if (count > 0 && answered >= count) break;
}
await nc.drain();
