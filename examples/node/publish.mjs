// Publish into a roomcast room from a Node.js backend, over NATS (roomcast's backend API).
//
//   npm install
//   node publish.mjs --nats nats://127.0.0.1:4222 --room chat --text "deploy finished" [--key deploy-42]
//
// Every node serves `<prefix>.api.<method>` in one queue group, so any node answers. The
// reply is `{"result": {...}}` or `{"error": {"code": ..., "message": ...}}`.
import { parseArgs } from "node:util";
import { connect, JSONCodec } from "nats";

const { values: args } = parseArgs({
  options: {
    nats: { type: "string", default: "nats://127.0.0.1:4222" }, // NATS server of the cluster
    prefix: { type: "string", default: "roomcast" }, // api.prefix of the nodes
    room: { type: "string", default: "chat" },
    text: { type: "string", default: "hello from node" },
    key: { type: "string" }, // idempotency_key: a retry with the same key publishes once
  },
});
const jc = JSONCodec();

/** One API call: `result`, or throws with the error's code and message. */
async function call(nc, method, params) {
  const msg = await nc.request(`${args.prefix}.api.${method}`, jc.encode(params), { timeout: 5000 });
  const reply = jc.decode(msg.data);
  if (reply.error) throw new Error(`${method} failed: ${reply.error.code} ${reply.error.message}`);
  return reply.result;
}

const nc = await connect({ servers: args.nats });
try {
  const params = { room: args.room, data: { text: args.text } };
  if (args.key) params.idempotency_key = args.key;
  // With a key, retrying after a timeout is safe: the cluster publishes once.
  console.log(JSON.stringify({ published: await call(nc, "publish", params) }));

  // Fire and forget: no reply subject, carried out and not answered.
  nc.publish(`${args.prefix}.api.publish`, jc.encode({ room: args.room, data: { text: args.text, fire: true } }));
  await nc.flush();

  const { nodes } = await call(nc, "info", {});
  console.log(JSON.stringify({ nodes }));
} catch (e) {
  console.error(`publish.mjs: ${e.message}`);
  process.exitCode = 1;
} finally {
  await nc.drain();
}
