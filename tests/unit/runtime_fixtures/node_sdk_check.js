// Run by test_node_sdk with NODE_PATH=workers/runtime: exercises trace_sdk.js against the test gateway.
const sdk = require('trace_sdk');

(async () => {
  const out = {
    who: await sdk.whoami(),
    rows: await sdk.query('select n', 1),
    pub: await sdk.publish([{ a: 1 }], 'out'),
  };
  try {
    await sdk.query('boom');
  } catch (err) {
    out.err = { name: err.name, status: err.status, code: err.code, isGatewayError: err instanceof sdk.GatewayError };
  }
  console.log(JSON.stringify(out));
})().catch((err) => {
  console.error(err);
  process.exit(2);
});
