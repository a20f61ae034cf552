'use strict';
/**
 * A minimal Node.js Lambda runtime client: the built-in loop for `nodejs` bundles.
 *
 * Why our own: the runtime image carries Node built-ins only (no npm install at build or run time),
 * and one invocation per container needs only GET next / call / POST response.
 * Handler `file.function` (file may be `dir/file`; the function may be a dotted path): the file is
 * `<task root>/<file>.mjs` (dynamic import), else `.js`/`.cjs` (require, falling back to import for ESM).
 * Async handlers (returning a Promise) and callback handlers `(event, context, callback)` both work.
 * Node 18 and later: `http`, `fs`, `path` and `url` built-ins only, each loaded when first needed
 * (this Node compiles its built-ins at every start: `http` alone costs ~12 ms of the sandbox's CPU).
 *
 * Two ways to run:
 *   - as a script (`node node_loop.js`, what bootstrap.py starts): a Runtime API client over HTTP;
 *   - required by node_bootstrap.js, in its process: `invokeInProcess` hands one invocation (the same
 *     `next` headers and body the Runtime API serves) through the same handler loading, context and
 *     calling code, and reports the answer instead of POSTing it.
 */

const fs = require('fs');
const path = require('path');

const API = '/2018-06-01/runtime';

function taskRoot() {
  return process.env.LAMBDA_TASK_ROOT || '/var/task';
}

/** One HTTP call to the Runtime API; no timeout, because `next` blocks by design. */
function call(method, urlPath, body, headers) {
  const http = require('http');
  const [host, port] = (process.env.AWS_LAMBDA_RUNTIME_API || '127.0.0.1:9001').split(':');
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : Buffer.from(body);
    const req = http.request({
      host, port: Number(port), method, path: urlPath, agent: false,
      headers: Object.assign(data ? { 'Content-Length': data.length } : {}, headers || {}),
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.on('error', reject);
    if (data) req.write(data);
    req.end();
  });
}

/** Lambda's error shape from anything a handler may throw (an Error, a string, an object). */
function errorDocument(err, typeOverride) {
  if (err instanceof Error) {
    return {
      errorType: typeOverride || err.name || (err.constructor && err.constructor.name) || 'Error',
      errorMessage: err.message,
      stackTrace: String(err.stack || '').split('\n'),
    };
  }
  let message;
  try { message = typeof err === 'string' ? err : JSON.stringify(err); } catch (_) { message = String(err); }
  return { errorType: typeOverride || typeof err, errorMessage: String(message), stackTrace: [] };
}

async function postError(urlPath, doc) {
  const body = JSON.stringify(doc);
  return call('POST', urlPath, body, {
    'Content-Type': 'application/json', 'Lambda-Runtime-Function-Error-Type': doc.errorType,
  });
}

class InitError extends Error {
  constructor(doc) { super(doc.errorMessage); this.doc = doc; }
}

/** Resolve `file.function` to a function, loading CommonJS or ESM as the file demands.
 * `run(fn)` runs the synchronous load (node_bootstrap.js passes one that enforces the deadline). */
async function loadHandler(spec, run = (fn) => fn()) {
  const slash = spec.lastIndexOf('/');
  const dot = spec.indexOf('.', slash + 1);
  if (dot < 0 || dot === spec.length - 1) {
    throw new InitError({ errorType: 'Runtime.MalformedHandlerName', errorMessage: `Bad handler ${spec}`, stackTrace: [] });
  }
  const file = path.resolve(taskRoot(), spec.slice(0, dot));
  const attrs = spec.slice(dot + 1).split('.');
  let mod;
  try {
    if (fs.existsSync(`${file}.mjs`)) {
      const { pathToFileURL } = require('url');
      mod = await import(pathToFileURL(`${file}.mjs`).href);
    } else {
      try {
        mod = run(() => require(file));
      } catch (err) {
        if (err && err.code === 'ERR_REQUIRE_ESM') {
          const { pathToFileURL } = require('url');
          mod = await import(pathToFileURL(require.resolve(file)).href);
        } else {
          throw err;
        }
      }
    }
  } catch (err) {
    const doc = errorDocument(err, 'Runtime.ImportModuleError');
    doc.errorMessage = `Error: Cannot load module '${spec.slice(0, dot)}': ${err && err.message}`;
    throw new InitError(doc);
  }
  let fn = mod;
  for (const attr of attrs) fn = fn == null ? undefined : fn[attr];
  if (typeof fn !== 'function' && mod && mod.default) {
    fn = mod.default;
    for (const attr of attrs) fn = fn == null ? undefined : fn[attr];
  }
  if (typeof fn !== 'function') {
    throw new InitError({
      errorType: 'Runtime.HandlerNotFound', errorMessage: `${spec} is undefined or not exported`, stackTrace: [],
    });
  }
  return fn;
}

function makeContext(headers) {
  const deadline = Number(headers['lambda-runtime-deadline-ms'] || 0);
  const env = process.env;
  const context = {
    awsRequestId: headers['lambda-runtime-aws-request-id'],
    invokedFunctionArn: headers['lambda-runtime-invoked-function-arn'],
    functionName: env.AWS_LAMBDA_FUNCTION_NAME,
    functionVersion: env.AWS_LAMBDA_FUNCTION_VERSION,
    memoryLimitInMB: env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
    logGroupName: env.AWS_LAMBDA_LOG_GROUP_NAME,
    logStreamName: env.AWS_LAMBDA_LOG_STREAM_NAME,
    // Accepted for compatibility; the container is discarded after the one invocation either way.
    callbackWaitsForEmptyEventLoop: true,
    getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
  };
  return context;
}

/** Call the handler and settle on its first outcome: returned Promise, callback, or context.succeed/fail.
 * `run(fn)` makes the synchronous call (see loadHandler). */
function runHandler(handler, event, context, run = (fn) => fn()) {
  return new Promise((resolve, reject) => {
    let settled = false;
    const done = (err, result) => {
      if (settled) return;
      settled = true;
      if (err !== undefined && err !== null) reject(err); else resolve(result);
    };
    context.done = done;
    context.succeed = (result) => done(null, result);
    context.fail = (err) => done(err === undefined ? new Error('handled') : err);
    let ret;
    try {
      ret = run(() => handler(event, context, done));
    } catch (err) {
      done(err);
      return;
    }
    if (ret && typeof ret.then === 'function') {
      ret.then((result) => done(null, result), (err) => done(err === undefined ? new Error('rejected') : err));
    } else if (handler.length < 3) {
      done(null, ret);  // a plain synchronous handler: its return value is the result
    }
  });
}

/** What one `next` turns into: the handler's answer as ['response', JSON text] or ['error', error document].
 * The same steps for both ways of running. */
async function answer(handler, next, run) {
  const context = makeContext(next.headers);
  if (next.headers['lambda-runtime-trace-id']) process.env._X_AMZN_TRACE_ID = next.headers['lambda-runtime-trace-id'];
  try {
    const event = next.body.length ? JSON.parse(next.body.toString('utf8')) : null;
    const result = await runHandler(handler, event, context, run);
    return ['response', JSON.stringify(result === undefined ? null : result)];
  } catch (err) {
    console.error(err);
    return ['error', errorDocument(err)];
  }
}

/**
 * One invocation in this process (node_bootstrap.js): `next` is {headers (lower-case names), body (Buffer)}
 * exactly as GET next would answer; `report(kind, payload)` receives ('invoke') when the handler is about to
 * be called, then what the loop would POST: ('init_error', document), ('error', document) or ('response',
 * JSON text).
 */
async function invokeInProcess(next, report, run) {
  let handler;
  try {
    handler = await loadHandler(process.env._HANDLER || '', run);
  } catch (err) {
    const doc = err instanceof InitError ? err.doc : errorDocument(err, 'Runtime.ImportModuleError');
    console.error(`[node_loop] init failed: ${doc.errorMessage}`);
    report('init_error', doc);
    return;
  }
  report('invoke');
  const [kind, payload] = await answer(handler, next, run);
  report(kind, payload);
}

let current = null;  // the request id being served, for errors that escape the handler

async function main() {
  let handler;
  try {
    handler = await loadHandler(process.env._HANDLER || '');
  } catch (err) {
    const doc = err instanceof InitError ? err.doc : errorDocument(err, 'Runtime.ImportModuleError');
    console.error(`[node_loop] init failed: ${doc.errorMessage}`);
    await postError(`${API}/init/error`, doc);
    process.exit(1);
  }
  for (;;) {
    let next;
    try {
      next = await call('GET', `${API}/invocation/next`);
    } catch (_) {
      return;  // the Runtime API is gone: the wrapper is done with us
    }
    if (next.status !== 200) return;
    const base = `${API}/invocation/${next.headers['lambda-runtime-aws-request-id']}`;
    current = base;
    const [kind, payload] = await answer(handler, next);
    current = null;
    if (kind === 'error') {
      await postError(`${base}/error`, payload);
      continue;
    }
    const res = await call('POST', `${base}/response`, payload, { 'Content-Type': 'application/json' });
    if (res.status !== 202) console.error(`[node_loop] response answered ${res.status}: ${res.body.toString().slice(0, 200)}`);
  }
}

/** An exception or rejection outside the handler's promise chain still fails the invocation, as on Lambda. */
function escaped(kind) {
  return (err) => {
    console.error(err);
    const target = current ? `${current}/error` : `${API}/init/error`;
    current = null;
    const doc = errorDocument(err, kind);
    postError(target, doc).finally(() => process.exit(129));
  };
}

module.exports = { InitError, errorDocument, loadHandler, makeContext, runHandler, invokeInProcess };

if (require.main === module) {
  process.on('uncaughtException', escaped(undefined));
  process.on('unhandledRejection', escaped('Runtime.UnhandledPromiseRejection'));
  main().catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
