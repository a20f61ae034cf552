'use strict';
/**
 * The Node sandbox's entry point: bootstrap.py's contract, written in Node, so that no Python starts in a
 * Node sandbox. The Docker backend starts it for `nodejs` bundles (every other runtime, and the other
 * backends, use bootstrap.py), from a startup snapshot where the image has one (see below).
 *
 * Same environment in (TRACE_RUNTIME=nodejs, _HANDLER, TRACE_EVENT / TRACE_EVENT_FILE, TRACE_TIMEOUT_S,
 * TRACE_FUNCTION_NAME, TRACE_MEMORY_MB, TRACE_REQUEST_ID, TRACE_RESULT_FILE, TRACE_TASK_ROOT,
 * TRACE_CAPABILITY_TOKEN, TRACE_GATEWAY, PATH), same result out: one JSON line (status ok | error |
 * init_error | timeout | exited, response, error, duration_ms, exit_code, peak_memory_bytes) in
 * TRACE_RESULT_FILE, or on stdout after a `__TRACE_RESULT__` line when that file cannot be written;
 * exit status 0 only for ok.
 *
 * Why it is built for a CPU quota: the sandbox gets 25 ms of CPU per 100 ms, and this Node (Debian's) has
 * no startup snapshot or code cache: `node -e 0` alone spends ~78 ms of CPU compiling Node's own
 * bootstrap, and every built-in module is compiled when first required (`require('fs')` ~9 ms, because
 * its loader also evaluates `fs.promises`; a loopback HTTP server and client with `net` ~17 ms).
 *   - The image builds a startup snapshot of this file (`node --snapshot-blob node_bootstrap.blob
 *     --build-snapshot node_bootstrap.js`, see deploy/images/build.sh): Node's bootstrap, `fs`, `path` and
 *     this code, ready; a start from it costs ~45 ms of CPU. Run as a plain script, it works the same.
 *   - The built-in loop (node_loop.js) runs IN this process and is handed the invocation directly rather
 *     than fetching it over a loopback Runtime API. Why that is as faithful: the Runtime API is the
 *     transport between the wrapper and its own loop, both ours; the loop gets the `next` headers and body
 *     the API would serve (request id, deadline, function ARN, trace id, the event bytes) and runs the same
 *     code on them as the HTTP loop (node_loop.js's loadHandler, makeContext, runHandler), so the handler
 *     sees the same event, the same context and the same environment, built from scratch before the
 *     handler is loaded (the wrapper's own variables are deleted from process.env). The one difference:
 *     AWS_LAMBDA_RUNTIME_API is not set, as no HTTP Runtime API listens (a bundle that brings its own
 *     runtime client uses the `provided` runtime).
 *
 * What a separate process gave, kept in one: process.exit() in the handler ends as `exited` with its code
 * (the 'exit' event writes the result); an exception or rejection escaping the handler is its error;
 * SIGTERM ends the invocation as terminated; the deadline is a timer, and a handler that blocks the event
 * loop in its synchronous part (the first turn of the handler, or the module's top level) is interrupted
 * by V8 at the deadline (vm's `timeout`). A loop that blocks later (after an `await`) holds the timer
 * off: the backend's outer bound ends it (Docker: timeout + 1.5 s, reported as timeout).
 */

const fs = require('fs');
const path = require('path');
const v8 = require('v8');
// Taken now, so that a start from the snapshot need not call this entry's `require` for it (in a snapshot
// that `require` warns, on stderr, about modules snapshots do not support); its createRequire gives the
// ordinary one.
const Module = require('module');

const RUNTIME_DIR = __dirname;
const VETTED_NODE_MODULES = path.join(path.dirname(RUNTIME_DIR), 'node_modules');  // deploy/images/node-libraries.txt (build.sh)
const MAX_RESPONSE_BYTES = 6 * 1024 * 1024;  // Lambda's synchronous payload limit
const DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
const DEFAULT_GATEWAY = 'unix:///run/trace/gateway.sock';
const RESULT_MARKER = '__TRACE_RESULT__';
const REGION = 'us-east-1';
const PEAK_MEMORY_FILES = ['/sys/fs/cgroup/memory/memory.max_usage_in_bytes', '/sys/fs/cgroup/memory.peak'];
const CALL_KEY = 'trace.runtime.call';

function errorDoc(message, type, stack) {
  return { errorMessage: message, errorType: type, stackTrace: stack || [] };
}

function hex(count) {  // not crypto: loading `crypto` costs more than an id needs
  let text = '';
  while (text.length < count) text += Math.floor(Math.random() * 0x100000000).toString(16).padStart(8, '0');
  return text.slice(0, count);
}

function uuid4() {
  const h = hex(32);
  const variant = ((parseInt(h[16], 16) & 0x3) | 0x8).toString(16);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-${variant}${h.slice(17, 20)}-${h.slice(20)}`;
}

function peakMemoryBytes() {
  for (const file of PEAK_MEMORY_FILES) {
    try {
      const value = Number.parseInt(fs.readFileSync(file, 'latin1').trim(), 10);
      if (Number.isSafeInteger(value)) return value;
    } catch (_) { /* next */ }
  }
  return null;
}

function handlerEnvironment(wrapperEnv, handler, taskRoot, requestId) {
  const name = wrapperEnv.TRACE_FUNCTION_NAME || 'trace-udf';
  const searchPath = `${taskRoot}:${RUNTIME_DIR}`;  // the SDK importable without vendoring it
  const env = {
    _HANDLER: handler,
    LAMBDA_TASK_ROOT: taskRoot,
    LAMBDA_RUNTIME_DIR: RUNTIME_DIR,
    AWS_LAMBDA_FUNCTION_NAME: name,
    AWS_LAMBDA_FUNCTION_MEMORY_SIZE: wrapperEnv.TRACE_MEMORY_MB || '512',
    AWS_LAMBDA_FUNCTION_VERSION: '$LATEST',
    AWS_LAMBDA_LOG_GROUP_NAME: `/aws/lambda/${name}`,
    AWS_LAMBDA_LOG_STREAM_NAME: `${new Date().toISOString().slice(0, 10).replace(/-/g, '/')}/[$LATEST]${requestId}`,
    AWS_REGION: REGION,
    AWS_DEFAULT_REGION: REGION,
    TZ: 'UTC',
    LANG: 'C.UTF-8',
    PATH: wrapperEnv.PATH || DEFAULT_PATH,
    HOME: '/tmp',
    TRACE_GATEWAY: wrapperEnv.TRACE_GATEWAY || DEFAULT_GATEWAY,
    PYTHONPATH: searchPath,
    // Then the image's vetted libraries (deploy/images/node-libraries.txt): after the bundle's own node_modules,
    // which Node searches before NODE_PATH (Lambda's layer precedence).
    NODE_PATH: `${searchPath}:${VETTED_NODE_MODULES}`,
  };
  if (wrapperEnv.TRACE_CAPABILITY_TOKEN !== undefined) env.TRACE_CAPABILITY_TOKEN = wrapperEnv.TRACE_CAPABILITY_TOKEN;
  return env;
}

/** Forget how this process started (`--snapshot-blob`): a handler's child_process.fork() or Worker inherits
 * process.execArgv, and a Node started from this snapshot runs this wrapper, not the module it was given. */
function forgetSnapshot() {
  const argv = process.execArgv;
  for (let i = argv.length - 1; i >= 0; i -= 1) {
    if (argv[i] === '--snapshot-blob') argv.splice(i, 2);
    else if (argv[i].startsWith('--snapshot-blob=')) argv.splice(i, 1);
  }
}

/** One invocation, start to end (called at start-up, or when the process starts from the snapshot). */
function start() {
  const started = process.hrtime();
  forgetSnapshot();
  const wrapperEnv = Object.assign({}, process.env);
  const timeoutS = Number(wrapperEnv.TRACE_TIMEOUT_S || 60);
  const deadlineEpochMs = Date.now() + timeoutS * 1000;
  const runtimeRequire = Module.createRequire(path.join(RUNTIME_DIR, 'node_bootstrap.js'));

  let outcome = null;  // {status, response (JSON text, for ok), error, exitCode}, once known
  let outcomeAt = null;
  let written = false;

  const elapsedMs = () => Math.round((outcomeAt[0] * 1e3 + outcomeAt[1] / 1e6) * 1000) / 1000;

  /** The result line, ASCII only (as Python's json.dumps writes it); an ok response is spliced in as sent. */
  function resultLine() {
    const doc = {
      status: outcome.status, response: null, error: outcome.error || null, duration_ms: elapsedMs(),
      exit_code: outcome.exitCode === undefined ? null : outcome.exitCode, peak_memory_bytes: peakMemoryBytes(),
    };
    let line = JSON.stringify(doc);
    if (outcome.status === 'ok') line = line.replace('"response":null', () => `"response":${outcome.response}`);
    return `${line.replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)}\n`;
  }

  function writeResult() {
    if (written) return;
    written = true;
    const line = resultLine();
    try {
      fs.writeFileSync(wrapperEnv.TRACE_RESULT_FILE || '/run/trace/result.json', line);
    } catch (err) {
      fs.writeSync(2, `[trace-runtime] cannot write the result file (${err.message}); printing it to stdout\n`);
      fs.writeSync(1, `${RESULT_MARKER}\n${line}`);
    }
  }

  /** The outcome is known: record it (the first one wins) and exit; the 'exit' listener writes the result. */
  function settle(status, fields) {
    if (outcome) return;
    outcome = Object.assign({ status }, fields);
    outcomeAt = process.hrtime(started);
    process.exit(status === 'ok' ? 0 : 1);
  }

  function timedOut() {
    settle('timeout', { error: errorDoc(`Task timed out after ${timeoutS.toFixed(2)} seconds`, 'Sandbox.Timedout') });
  }

  process.on('exit', (code) => {
    if (!outcome) {  // the handler called process.exit(), or the event loop emptied without an answer
      outcome = { status: 'exited', exitCode: code,
                  error: errorDoc(`Runtime exited without answering: exit status ${code}`, 'Runtime.ExitError') };
      outcomeAt = process.hrtime(started);
    }
    writeResult();
    process.exitCode = outcome.status === 'ok' ? 0 : 1;
  });

  try {
    invoke();
  } catch (err) {  // a bug of ours: still one result line
    settle('error', { error: errorDoc(String((err && err.stack) || err), 'Trace.WrapperError') });
  }

  function invoke() {
    // Run `fn` synchronously, interrupted by V8 at the deadline: a handler that never yields cannot be
    // stopped by a timer.
    const vm = runtimeRequire('vm');
    const callScript = new vm.Script(
      `(() => { const f = globalThis[Symbol.for(${JSON.stringify(CALL_KEY)})]; `
      + `delete globalThis[Symbol.for(${JSON.stringify(CALL_KEY)})]; return f(); })()`, { filename: 'trace-runtime' });
    function withDeadline(fn) {
      const left = deadlineEpochMs - Date.now();
      if (left <= 0) timedOut();
      globalThis[Symbol.for(CALL_KEY)] = fn;
      try {
        return callScript.runInThisContext({ timeout: Math.max(1, left), displayErrors: false });
      } catch (err) {
        if (err && err.code === 'ERR_SCRIPT_EXECUTION_TIMEOUT') timedOut();
        throw err;
      } finally {
        delete globalThis[Symbol.for(CALL_KEY)];
      }
    }

    const runtime = wrapperEnv.TRACE_RUNTIME || 'nodejs';
    const taskRoot = wrapperEnv.TRACE_TASK_ROOT || '/var/task';
    let event;
    try {
      event = wrapperEnv.TRACE_EVENT !== undefined
        ? Buffer.from(wrapperEnv.TRACE_EVENT)
        : fs.readFileSync(wrapperEnv.TRACE_EVENT_FILE || '/run/trace/event.json');
      JSON.parse(event.toString('utf8'));  // checked here, so a platform bug shows up as one clear error
    } catch (err) {
      settle('error', { error: errorDoc(`cannot read the event: ${err.message}`, 'Trace.InvalidEvent') });
      return;
    }
    if (runtime !== 'nodejs') {
      settle('init_error', { error: errorDoc(`node_bootstrap.js runs nodejs bundles, not ${JSON.stringify(runtime)}`,
                                             'Runtime.InvalidRuntime') });
      return;
    }
    const requestId = wrapperEnv.TRACE_REQUEST_ID || uuid4();
    const functionName = wrapperEnv.TRACE_FUNCTION_NAME || 'trace-udf';

    // The handler's world: its environment only (built before its module is loaded), the task root as cwd.
    const env = handlerEnvironment(wrapperEnv, wrapperEnv._HANDLER || '', taskRoot, requestId);
    for (const key of Object.keys(process.env)) delete process.env[key];
    Object.assign(process.env, env);
    Module._initPaths();  // NODE_PATH is read at start-up: read it again
    try {
      process.chdir(taskRoot);
    } catch (err) {
      settle('init_error', { error: errorDoc(`cannot enter the task root: ${err.message}`,
                                             'Runtime.InvalidEntrypoint') });
      return;
    }

    setTimeout(timedOut, Math.max(0, deadlineEpochMs - Date.now())).unref();  // unref: an empty loop still ends
    const terminated = errorDoc('the wrapper was terminated', 'Sandbox.Terminated');
    process.on('SIGTERM', () => settle('error', { error: terminated }));

    // What GET /2018-06-01/runtime/invocation/next would answer.
    const next = {
      headers: {
        'lambda-runtime-aws-request-id': requestId,
        'lambda-runtime-deadline-ms': String(deadlineEpochMs),
        'lambda-runtime-invoked-function-arn': `arn:aws:lambda:${REGION}:000000000000:function:${functionName}`,
        'lambda-runtime-trace-id': `Root=1-${Math.floor(Date.now() / 1000).toString(16).padStart(8, '0')}-${hex(24)};`
          + `Parent=${hex(16)};Sampled=0`,
      },
      body: event,
    };
    // Loaded now, not in the snapshot: code compiled into a snapshot cannot import() (ESM handlers).
    const loop = runtimeRequire('./node_loop.js');
    let invoking = false;  // the handler was called: an escaped error is the invocation's, not init's
    const escaped = (kind) => (err) => {  // an exception or rejection outside the handler's promise chain
      console.error(err);
      settle(invoking ? 'error' : 'init_error', { error: loop.errorDocument(err, kind) });
    };
    process.on('uncaughtException', escaped(undefined));
    process.on('unhandledRejection', escaped('Runtime.UnhandledPromiseRejection'));

    loop.invokeInProcess(next, (kind, payload) => {
      if (kind === 'invoke') {
        invoking = true;
      } else if (kind === 'init_error') {
        settle('init_error', { error: payload });
      } else if (kind === 'error') {
        settle('error', { error: payload });
      } else {
        const body = payload === undefined ? '""' : payload;
        if (Buffer.byteLength(body) > MAX_RESPONSE_BYTES) {
          settle('error', { error: errorDoc(`response body exceeds the limit of ${MAX_RESPONSE_BYTES} bytes`,
                                            'result_too_large') });
        } else {
          settle('ok', { response: body });
        }
      }
    }, withDeadline).catch((err) => settle('error', { error: loop.errorDocument(err, 'Trace.WrapperError') }));
  }
}

function main() {
  const resultFile = process.env.TRACE_RESULT_FILE || '/run/trace/result.json';
  try {
    start();
  } catch (err) {  // failed before start() could report it itself: the platform must still get a result line
    const line = JSON.stringify({ status: 'error', response: null, error: errorDoc(String((err && err.stack) || err),
      'Trace.WrapperError'), duration_ms: 0, exit_code: null, peak_memory_bytes: peakMemoryBytes() });
    try {
      fs.writeFileSync(resultFile, `${line}\n`);
    } catch (_) {
      fs.writeSync(1, `${RESULT_MARKER}\n${line}\n`);
    }
    process.exit(1);
  }
}

if (v8.startupSnapshot && v8.startupSnapshot.isBuildingSnapshot()) {
  v8.startupSnapshot.setDeserializeMainFunction(main);
} else {
  main();
}
