// Answer roomcast clients' `rpc` calls (method `get_profile`) from a Node.js backend.
//
//   npm install
//   NATS_URL=nats://127.0.0.1:4222 node rpc_responder.mjs
import { connect, JSONCodec } from "nats";

const url = process.env.NATS_URL ?? "nats://127.0.0.1:4222";
const prefix = process.env.ROOMCAST_PREFIX ?? "roomcast";
const jc = JSONCodec();

const nc = await connect({ servers: url });
// A queue group: run as many responders as needed, each call goes to one.
const sub = nc.subscribe(`${prefix}.rpc.get_profile`, { queue: "profile-service" });
console.log("ready");
for await (const m of sub) {
  const user = m.headers?.get("roomcast-user") ?? "";
  const client = m.headers?.get("roomcast-client") ?? "";
  // JSON clients' calls carry JSON; MessagePack ones `content-type: application/msgpack`.
  const asked = m.data.length ? jc.decode(m.data) : null;
  m.respond(jc.encode({ user, client, asked, name: "Bob", status: "away" }));
}
