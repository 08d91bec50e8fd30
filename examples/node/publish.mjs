// Publish into a roomcast room from a Node.js backend, over NATS.
//
//   npm install
//   NATS_URL=nats://127.0.0.1:4222 node publish.mjs chat "deploy finished"
import { connect, JSONCodec } from "nats";

const url = process.env.NATS_URL ?? "nats://127.0.0.1:4222";
const prefix = process.env.ROOMCAST_PREFIX ?? "roomcast";
const [room = "chat", text = "hello from node"] = process.argv.slice(2);
const jc = JSONCodec();

const nc = await connect({ servers: url });

/** One API call: `result`, or throws with the error's code and message. */
async function call(method, params) {
  const msg = await nc.request(`${prefix}.api.${method}`, jc.encode(params), { timeout: 5000 });
  const reply = jc.decode(msg.data);
  if (reply.error) throw new Error(`${method}: ${reply.error.code} ${reply.error.message}`);
  return reply.result;
}

try {
  // With an idempotency_key a retry publishes once (within the configured window).
  const pos = await call("publish", { room, data: { text }, idempotency_key: `node-${room}-${text}` });
  console.log("published", pos);
  // Fire and forget: no reply subject.
  nc.publish(`${prefix}.api.publish`, jc.encode({ room, data: { text, fire: true } }));
  const { nodes } = await call("info", {});
  console.log("nodes", nodes);
} finally {
  await nc.drain();
}
