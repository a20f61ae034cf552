'use strict';
/**
 * Trace SDK for Node UDFs: the task gateway's calls, Node built-ins only.
 *
 * Why a unix socket: the sandbox has no network; the platform mounts the gateway's socket at
 * /run/trace/gateway.sock (TRACE_GATEWAY overrides it, as unix:///path or, for development,
 * http://host:port). The capability token (TRACE_CAPABILITY_TOKEN) is the only credential.
 * The wrapper puts this file's directory on NODE_PATH, so a handler just does require('trace_sdk').
 */

const http = require('http');
const https = require('https');

const DEFAULT_GATEWAY = 'unix:///run/trace/gateway.sock';
const DEFAULT_TIMEOUT_MS = 60000;

/** A non-2xx answer from the gateway (or no answer: status 0), with the platform's error code. */
class GatewayError extends Error {
  constructor(status, code, message) {
    super(`${status} ${code}: ${message}`);
    this.name = 'GatewayError';
    this.status = status;
    this.code = code;
    this.detail = message;
  }
}

function target() {
  const gateway = process.env.TRACE_GATEWAY || DEFAULT_GATEWAY;
  if (gateway.startsWith('unix://')) return { socketPath: gateway.slice('unix://'.length) };
  if (gateway.startsWith('/')) return { socketPath: gateway };
  if (gateway.startsWith('http://')) {
    const url = new URL(gateway);
    return { host: url.hostname, port: Number(url.port || 80) };
  }
  if (gateway.startsWith('https://')) { // Fargate: the public /v1/task/ route over TLS
    const url = new URL(gateway);
    return { host: url.hostname, port: Number(url.port || 443), tls: true };
  }
  throw new GatewayError(0, 'bad_gateway_address', `unsupported TRACE_GATEWAY ${gateway}`);
}

/** One JSON request; resolves to the decoded body or rejects with GatewayError. */
function call(method, path, payload) {
  return new Promise((resolve, reject) => {
    const token = process.env.TRACE_CAPABILITY_TOKEN;
    if (!token) {
      reject(new GatewayError(0, 'missing_token', 'TRACE_CAPABILITY_TOKEN is not set'));
      return;
    }
    let options;
    try { options = target(); } catch (err) { reject(err); return; }
    const body = payload === undefined ? null : Buffer.from(JSON.stringify(payload));
    const headers = { Authorization: `Bearer ${token}`, Accept: 'application/json' };
    if (!options.tls) headers.Host = 'gateway';
    if (body) Object.assign(headers, { 'Content-Type': 'application/json', 'Content-Length': body.length });
    const client = options.tls ? https : http;
    delete options.tls;
    const req = client.request(Object.assign(options, { method, path, headers, agent: false, timeout: DEFAULT_TIMEOUT_MS }), (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('error', (err) => reject(new GatewayError(0, 'gateway_unreachable', err.message)));
      res.on('end', () => {
        const raw = Buffer.concat(chunks).toString('utf8');
        let data = null;
        try { data = raw ? JSON.parse(raw) : null; } catch (_) { data = undefined; }
        const status = res.statusCode;
        if (status >= 200 && status < 300) {
          if (data === undefined) reject(new GatewayError(status, 'bad_response', 'the gateway answered non-JSON'));
          else resolve(data);
          return;
        }
        const error = data && typeof data === 'object' ? data.error : null;
        if (error && typeof error === 'object') {
          reject(new GatewayError(status, String(error.code || `http_${status}`), String(error.message || '')));
        } else {
          reject(new GatewayError(status, `http_${status}`, raw.slice(0, 500)));
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', (err) => reject(new GatewayError(0, 'gateway_unreachable', err.message)));
    if (body) req.write(body);
    req.end();
  });
}

/** What the token grants: task, attempt, org, pinned inputs, output prefix. */
async function whoami() {
  return (await call('GET', '/v1/task/whoami')) || {};
}

/** Run a read-only SQL query over the datasets the token may read; resolves to the rows. */
async function query(sql, limit = null) {
  const answer = (await call('POST', '/v1/task/query', { sql, limit })) || {};
  return Array.isArray(answer.rows) ? answer.rows : [];
}

/** Publish rows to the task's output dataset (or `dataset`); idempotent and fenced by the platform. */
async function publish(rows, dataset = null) {
  return (await call('POST', '/v1/task/buffer-publish', { rows: Array.from(rows), dataset })) || {};
}

module.exports = { GatewayError, whoami, query, publish };
