'use strict';
/*
 * The Lambdabus Node.js runtime: serves handler.js's main(event, context) over HTTP/1.1.
 * Node's own modules only. Same flags and process contract as `python -m lambdabus_runtime`:
 *
 *   node server.js --code DIR --entrypoint handler.js --function NS/NAME [--port 0]
 *       [--host 127.0.0.1] [--socket PATH] [--timeout SECONDS] [--memory MIB] [--runtime nodejs20]
 *       [--max-body BYTES] [--handler FUNCTION]
 *
 * - With LAMBDABUS_ENV_FILE set, the JSON object in that file joins process.env before the
 *   function is loaded (the sandbox passes the function's env this way).
 * - Prints {"event": "listening", "port": N} (or {"event": "listening", "socket": PATH} with
 *   --socket) on stdout once it serves; an exception while
 *   loading the entry point prints its stack on stderr and exits 3; SIGTERM stops accepting,
 *   lets in-flight requests finish (up to 5 s) and exits 0. GET /healthz answers itself.
 * - require() finds the function's dependencies through NODE_PATH (set by the deployer).
 *   An ES module entry point (ERR_REQUIRE_ESM) is loaded with import().
 * - event: {data, 'ce-type', 'ce-source', 'ce-id', 'ce-time', 'ce-specversion' ('' when
 *   absent), other ce-* headers, extensions: {request: {method, url, path, headers, query,
 *   body}}}. `data` is the parsed body for a JSON content type (invalid JSON → 400), a Buffer
 *   for application/octet-stream, the parsed body for application/x-www-form-urlencoded
 *   holding a JSON object or array (what `curl -d` sends), otherwise a string when the body
 *   is UTF-8 (else a Buffer), null when empty. `path` has a leading /NS/NAME cut off.
 * - Kubeless: --handler names the export to call (`index.helloGet` → helloGet; default main);
 *   the event also has 'event-id', 'event-type', 'event-time' (RFC 3339, UTC, Z) and
 *   'event-namespace' (from the same-named headers, else the CloudEvent, else made up), and
 *   extensions.response: status(code), set(name, value) / header(), send(body), json(body),
 *   end() (what they set is answered when main returns nothing; a status also applies to a
 *   returned value). FUNC_TIMEOUT (seconds) and REQ_MB_LIMIT (MB of a request body) in the
 *   function's env replace --timeout and --max-body.
 * - context: {'function-name', namespace, timeout, runtime, 'memory-limit'}.
 * - The value main returns (or its promise resolves to): null/undefined → 204; a string →
 *   text/plain; a Buffer/Uint8Array → application/octet-stream; an object whose `statusCode`
 *   is a number → that response: {statusCode, headers, body, isBase64Encoded} with `body`
 *   encoded by the same rules (isBase64Encoded: a base64 string body is decoded), as AWS
 *   Lambda proxy integrations answer; any other value → JSON.
 * - A thrown error → 500 {"error": {"code": "function_error", "message": "<name>: <message>"}},
 *   its stack on stderr; running past --timeout → 504 function_timeout (the call cannot be
 *   stopped and runs on).
 */

const { AsyncLocalStorage } = require('async_hooks');
const http = require('http');
const path = require('path');
const { pathToFileURL } = require('url');

const EXIT_USAGE = 2;
const EXIT_IMPORT_ERROR = 3;
const EXIT_BIND_ERROR = 1;
const EXIT_ENV = 4;
const DRAIN_GRACE_MS = 5000;
const IDLE_TIMEOUT_MS = 300000;
const MAX_HEAD = 64 * 1024;

const USAGE =
  'usage: node server.js --code DIR --entrypoint FILE --function NS/NAME [--port PORT]\n' +
  '       [--host HOST] [--socket PATH] [--timeout SECONDS] [--memory MIB] [--runtime NAME]\n' +
  '       [--max-body BYTES] [--handler FUNCTION]\n';

// Per-invocation log lines (as lambdabus_runtime.capture does for Python): what the function
// writes during an invocation goes out as whole lines, each after "\x1e<id>\x1f"; the deployer
// takes the tag off into the log record's `invocation` field.
const invocations = new AsyncLocalStorage();
const SAFE_ID = /^[A-Za-z0-9._:/@+=-]{1,128}$/;

function invocationId(headers) {
  for (const key of ['x-lambdabus-invocation-id', 'ce-id']) {
    const value = headers[key];
    if (typeof value === 'string' && SAFE_ID.test(value)) return value;
  }
  return require('crypto').randomUUID().replace(/-/g, '');
}

const tagged = [];

function tagStream(stream, key) {
  const write = stream.write.bind(stream);
  stream.write = (chunk, encoding, callback) => {
    const state = invocations.getStore();
    if (!state) return write(chunk, encoding, callback);
    const done = typeof encoding === 'function' ? encoding : callback;
    const text =
      typeof chunk === 'string'
        ? chunk
        : Buffer.from(chunk).toString(typeof encoding === 'string' ? encoding : 'utf8');
    const whole = (state[key] || '') + text;
    const at = whole.lastIndexOf('\n');
    if (at < 0) {
      state[key] = whole;
      if (done) process.nextTick(done);
      return true;
    }
    state[key] = whole.slice(at + 1);
    const lines = whole.slice(0, at).split('\n');
    return write(lines.map((line) => `\x1e${state.id}\x1f${line}\n`).join(''), done);
  };
  tagged.push((state) => {
    if (state[key]) {
      write(`\x1e${state.id}\x1f${state[key]}\n`);
      state[key] = '';
    }
  });
}

function log(message) {
  process.stderr.write(`lambdabus-runtime: ${message}\n`);
}

function usageError(message) {
  process.stderr.write(`${USAGE}server.js: error: ${message}\n`);
  process.exit(EXIT_USAGE);
}

function parseArgs(argv) {
  const known = new Set(['code', 'entrypoint', 'function', 'port', 'host', 'socket', 'timeout', 'memory', 'runtime', 'max-body', 'handler']);
  const raw = {};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '-h' || arg === '--help') {
      process.stdout.write(USAGE);
      process.exit(0);
    }
    if (!arg.startsWith('--')) usageError(`unexpected argument ${JSON.stringify(arg)}`);
    const eq = arg.indexOf('=');
    const key = eq === -1 ? arg.slice(2) : arg.slice(2, eq);
    if (!known.has(key)) usageError(`unknown option --${key}`);
    if (eq === -1) {
      if (i + 1 === argv.length) usageError(`--${key} needs a value`);
      raw[key] = argv[++i];
    } else {
      raw[key] = arg.slice(eq + 1);
    }
  }
  for (const key of ['code', 'entrypoint', 'function']) {
    if (raw[key] === undefined) usageError(`missing --${key}`);
  }
  const parts = raw.function.split('/');
  if (parts.length !== 2 || !parts[0] || !parts[1]) usageError('--function must be NS/NAME');
  const number = (key, fallback, check) => {
    if (raw[key] === undefined) return fallback;
    const value = Number(raw[key]);
    if (raw[key].trim() === '' || !check(value)) usageError(`invalid value for --${key}: ${JSON.stringify(raw[key])}`);
    return value;
  };
  return {
    code: raw.code,
    entrypoint: raw.entrypoint,
    namespace: parts[0],
    name: parts[1],
    port: number('port', 0, (v) => Number.isInteger(v) && v >= 0 && v <= 65535),
    host: raw.host === undefined ? '127.0.0.1' : raw.host,
    socket: raw.socket === undefined ? null : raw.socket,
    timeout: number('timeout', 180, (v) => Number.isFinite(v) && v > 0),
    memory: number('memory', null, (v) => Number.isInteger(v) && v > 0),
    runtime: raw.runtime === undefined ? 'nodejs20' : raw.runtime,
    maxBody: number('max-body', 6 * 1024 * 1024, (v) => Number.isInteger(v) && v > 0),
    handler: raw.handler === undefined ? 'main' : raw.handler,
  };
}

async function loadMain(codeDir, entrypoint, handler) {
  const file = path.resolve(codeDir, entrypoint);
  let mod;
  try {
    mod = require(file);
  } catch (err) {
    if (!err || err.code !== 'ERR_REQUIRE_ESM') throw err;
    mod = await import(pathToFileURL(file).href);
  }
  if (typeof mod === 'function' && handler === 'main') return mod;
  if (mod && typeof mod[handler] === 'function') return mod[handler];
  if (mod && mod.default && typeof mod.default[handler] === 'function') return mod.default[handler];
  const exported = mod && typeof mod === 'object' ? Object.keys(mod).filter((k) => typeof mod[k] === 'function') : [];
  const more = exported.length ? `; it exports: ${exported.join(', ')}` : '';
  throw new Error(`${entrypoint} exports no ${handler} function${more}`);
}

// Kubeless's and Kyma's extensions.response: what the function sets on it is answered.
function makeResponse() {
  const response = {
    statusCode: null,
    headers: {},
    body: undefined,
    sent: false,
    status(code) {
      response.statusCode = code;
      return response;
    },
    set(name, value) {
      if (name && typeof name === 'object') Object.assign(response.headers, name);
      else response.headers[String(name)] = String(value);
      return response;
    },
    send(body) {
      response.body = body;
      response.sent = true;
      return response;
    },
    json(body) {
      response.set('content-type', 'application/json');
      return response.send(JSON.stringify(body));
    },
    end(body) {
      return response.send(body);
    },
  };
  response.header = response.set;
  return response;
}

function withResponse(result, response) {
  if ((result === undefined || result === null) && (response.sent || response.statusCode !== null)) {
    return { statusCode: response.statusCode ?? 200, headers: response.headers, body: response.body };
  }
  if (response.statusCode === null && Object.keys(response.headers).length === 0) return result;
  if (result && typeof result === 'object' && !Buffer.isBuffer(result) && typeof result.statusCode === 'number') return result;
  const [, headers, payload] = encodeResult(result);
  return { statusCode: response.statusCode ?? 200, headers: { ...headers, ...response.headers }, body: payload };
}

function kubelessFields(event, headers) {
  const media = String(headers['content-type'] || '').split(';')[0].trim().toLowerCase();
  event['event-id'] = headers['event-id'] || String(event['ce-id'] || '') || require('crypto').randomUUID();
  event['event-type'] = headers['event-type'] || String(event['ce-type'] || '') || media || 'none';
  let time = headers['event-time'];
  if (!time) {
    const parsed = event['ce-time'] ? new Date(String(event['ce-time'])) : new Date();
    time = (Number.isNaN(parsed.getTime()) ? new Date() : parsed).toISOString();
  }
  event['event-time'] = time;
  event['event-namespace'] = headers['event-namespace'] || String(event['ce-source'] || '') || 'http.lambdabus';
}

class InvalidJSON extends Error {}

const TIMED_OUT = Symbol('timed out');

const utf8 = new TextDecoder('utf-8', { fatal: true });

function decodeData(body, contentType) {
  if (body.length === 0) return null;
  let charsetOk = true;
  if (contentType) {
    const [mediaRaw, ...params] = contentType.split(';');
    const media = mediaRaw.trim().toLowerCase();
    if (media === 'application/json' || media.endsWith('+json')) {
      try {
        return JSON.parse(body.toString('utf8'));
      } catch (err) {
        throw new InvalidJSON(`the body is not valid JSON: ${err.message}`);
      }
    }
    if (media === 'application/octet-stream') return body;
    if (media === 'application/x-www-form-urlencoded' && /^\s*[[{]/.test(body.toString('latin1', 0, 64))) {
      // `curl -d '{...}'` labels JSON as a form; a form body never starts with { or [.
      try {
        return JSON.parse(body.toString('utf8'));
      } catch {
        // not JSON after all: a string, below
      }
    }
    for (const param of params) {
      const [name, value] = param.split('=');
      if (name.trim().toLowerCase() === 'charset' && value !== undefined) {
        charsetOk = ['utf-8', 'utf8', 'us-ascii'].includes(value.trim().replace(/"/g, '').toLowerCase());
      }
    }
  }
  if (!charsetOk) return body;
  try {
    return utf8.decode(body);
  } catch {
    return body;
  }
}

// A structured-mode CloudEvent (application/cloudevents+json): its attributes, and `data`
// (data_base64 decoded to a Buffer); null when the request is not one.
function structuredEvent(body, contentType) {
  if (!contentType || contentType.split(';')[0].trim().toLowerCase() !== 'application/cloudevents+json') return null;
  let value;
  try {
    value = JSON.parse(body.toString('utf8'));
  } catch {
    return null;
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value) || !('specversion' in value)) return null;
  const { data, data_base64: encoded, ...attributes } = value;
  return { ...attributes, data: typeof encoded === 'string' ? Buffer.from(encoded, 'base64') : data ?? null };
}

function safeDecode(text) {
  if (!text.includes('%')) return text;
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

const JSON_HEADERS = { 'content-type': 'application/json' };

function errorBody(code, message) {
  return JSON.stringify({ error: { code, message } });
}

function describe(err) {
  if (err instanceof Error) return err.message ? `${err.name}: ${err.message}` : err.name;
  return String(err);
}

function encodeBody(body, contentType) {
  if (body === undefined || body === null) return [Buffer.alloc(0), contentType];
  if (Buffer.isBuffer(body) || body instanceof Uint8Array) {
    return [body, contentType || 'application/octet-stream'];
  }
  if (typeof body === 'string') return [body, contentType || 'text/plain; charset=utf-8'];
  const text = JSON.stringify(body);
  if (text === undefined) throw new TypeError(`${typeof body} is not a response body`);
  return [text, contentType || 'application/json'];
}

// (status, headers, body) for the value main returned.
function encodeResult(result) {
  if (result === undefined || result === null) return [204, {}, ''];
  if (typeof result === 'object' && !Buffer.isBuffer(result) && typeof result.statusCode === 'number') {
    const status = result.statusCode;
    if (!Number.isInteger(status) || status < 200 || status > 599) {
      throw new RangeError(`statusCode must be an integer from 200 to 599, not ${status}`);
    }
    const headers = {};
    let contentType;
    for (const [name, value] of Object.entries(result.headers || {})) {
      if (name.toLowerCase() === 'content-type') contentType = String(value);
      else headers[name] = value;
    }
    let body = result.body;
    if (result.isBase64Encoded && typeof body === 'string') body = Buffer.from(body, 'base64');
    const [payload, type] = encodeBody(body, contentType);
    if (type) headers['content-type'] = type;
    return [status, headers, payload];
  }
  const [payload, type] = encodeBody(result, undefined);
  return [200, { 'content-type': type }, payload];
}

function applyEnvFile() {
  const file = process.env.LAMBDABUS_ENV_FILE;
  delete process.env.LAMBDABUS_ENV_FILE;
  if (!file) return;
  let env;
  try {
    env = JSON.parse(require('fs').readFileSync(file, 'utf8'));
  } catch (err) {
    log(`cannot read the function's env from ${file}: ${err.message}`);
    process.exit(EXIT_ENV);
  }
  const ok = env && typeof env === 'object' && !Array.isArray(env) &&
    Object.entries(env).every(([k, v]) => typeof v === 'string' && k && !k.includes('='));
  if (!ok) {
    log(`the function's env in ${file} is not an object of strings`);
    process.exit(EXIT_ENV);
  }
  Object.assign(process.env, env);
}

// `--pool`: started before its function is known (the deployer's pool of pre-started
// runtimes): node and this server are loaded; one JSON line on stdin, the control channel,
// says which function to serve, `{"argv": [...flags...], "env": {...}}` (its code is already
// where --code says). Stdin is closed after it. EOF first (the deployer is gone): exit 0.
// (Node cannot lower its own rlimits: the pool starts its node slots with the function's.)
function pooled() {
  const fs = require('fs');
  const chunks = [];
  const buffer = Buffer.alloc(65536);
  for (;;) {
    let n;
    try {
      n = fs.readSync(0, buffer, 0, buffer.length, null);
    } catch (err) {
      if (err.code === 'EAGAIN') continue;
      if (err.code === 'EOF') n = 0;
      else throw err;
    }
    if (n === 0) break;
    const chunk = Buffer.from(buffer.subarray(0, n));
    chunks.push(chunk);
    if (chunk.includes(10)) break;
  }
  fs.closeSync(0);
  fs.openSync('/dev/null', 'r'); // fd 0 again: nothing more comes from the control channel
  const line = Buffer.concat(chunks).toString('utf8').split('\n')[0];
  if (!line.trim()) process.exit(0);
  let message;
  try {
    message = JSON.parse(line);
  } catch (err) {
    log(`a pool message that is not valid: ${err.message}`);
    process.exit(EXIT_USAGE);
  }
  const argv = message && message.argv;
  if (!Array.isArray(argv) || !argv.every((a) => typeof a === 'string')) {
    log('a pool message whose argv is not strings');
    process.exit(EXIT_USAGE);
  }
  const env = message.env;
  const ok = env && typeof env === 'object' && !Array.isArray(env) &&
    Object.entries(env).every(([k, v]) => typeof v === 'string' && k && !k.includes('='));
  if (!ok) {
    log("the function's env is not an object of strings");
    process.exit(EXIT_ENV);
  }
  Object.assign(process.env, env);
  retitle(argv);
  process.argv = [process.argv[0], process.argv[1], ...argv];
}

// Show the function's flags in /proc/<pid>/cmdline (`ps`), as a runtime started for it would:
// they overwrite the argv area the pool padded for them. `--function NS/NAME` first.
function retitle(argv) {
  let flags = argv.slice();
  const at = flags.indexOf('--function');
  if (at !== -1 && at + 1 < flags.length) {
    flags = ['--function', flags[at + 1], ...flags.slice(0, at), ...flags.slice(at + 2)];
  }
  try {
    const fs = require('fs');
    const stat = fs.readFileSync('/proc/self/stat', 'latin1');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const start = Number(fields[45]);
    const end = Number(fields[46]);
    const head = fs.readFileSync('/proc/self/cmdline').toString('latin1').split('\0').slice(0, 2);
    let title = Buffer.from([...head, ...flags].join('\0') + '\0', 'latin1');
    const size = end - start;
    if (title.length > size) title = title.subarray(0, title.lastIndexOf(0, size - 1) + 1);
    const out = Buffer.alloc(size);
    title.copy(out);
    const fd = fs.openSync('/proc/self/mem', 'r+');
    try {
      fs.writeSync(fd, out, 0, size, start);
    } finally {
      fs.closeSync(fd);
    }
  } catch (err) {
    // best effort
  }
}

// A pre-started runtime warms up before it waits for its function: one request through node's
// HTTP server and client, on an abstract Unix socket of its own network namespace (no file,
// nothing left), and the modules the first invocation needs. Node compiles functions when
// first called: a cold start otherwise pays for compiling the HTTP paths (~10 ms) itself.
function warmUp() {
  return new Promise((resolve) => {
    const done = () => resolve();
    setTimeout(done, 1000).unref(); // a warm-up that stalls must not keep the slot from its line
    try {
      require('crypto').randomUUID();
      const address = `\0lambdabus-warm-up-${process.pid}`;
      const server = http.createServer((req, res) => {
        const chunks = [];
        req.on('data', (chunk) => chunks.push(chunk));
        req.on('error', () => {});
        req.on('end', () => {
          const body = JSON.stringify(
            invocations.run({ id: 'warm-up' }, () => JSON.parse(Buffer.concat(chunks).toString())),
          );
          res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
          res.end(body);
        });
      });
      const finish = () => {
        server.closeAllConnections();
        server.close(done);
      };
      server.on('error', done);
      server.listen({ path: address }, () => {
        const req = http.request(
          {
            socketPath: address,
            method: 'POST',
            path: '/warm-up',
            agent: false,
            headers: { 'Content-Type': 'application/json', Connection: 'close' },
          },
          (res) => {
            res.on('error', finish);
            res.resume();
            res.on('end', finish);
          },
        );
        req.on('error', finish);
        req.end('{"warm": true}');
      });
    } catch (err) {
      done();
    }
  });
}

function main() {
  const options = parseArgs(process.argv.slice(2));
  if (options.socket !== null && !options.socket.startsWith('/')) {
    usageError(`invalid value for --socket: ${JSON.stringify(options.socket)}`);
  }
  applyEnvFile();
  const envNumber = (name) => {
    const text = process.env[name];
    if (!text) return null;
    const value = Number(text);
    if (!Number.isFinite(value) || value <= 0) {
      log(`${name} must be a positive number, not ${JSON.stringify(text)}`);
      process.exit(EXIT_ENV);
    }
    return value;
  };
  const funcTimeout = envNumber('FUNC_TIMEOUT');
  if (funcTimeout !== null) options.timeout = funcTimeout;
  const reqLimit = envNumber('REQ_MB_LIMIT');
  if (reqLimit !== null) options.maxBody = Math.floor(reqLimit * 1024 * 1024);
  const prefix = `/${options.namespace}/${options.name}`;
  const timeoutMs = options.timeout * 1000;
  const context = {
    'function-name': options.name,
    namespace: options.namespace,
    timeout: options.timeout,
    runtime: options.runtime,
    'memory-limit': options.memory ? `${options.memory}Mi` : null,
  };
  let draining = false;

  function send(res, status, headers, body) {
    if (res.headersSent) return;
    if (draining) headers = { ...headers, connection: 'close' };
    if (status === 204 || status === 304) {
      res.writeHead(status, headers);
      res.end();
      return;
    }
    res.writeHead(status, { ...headers, 'content-length': Buffer.byteLength(body) });
    res.end(body);
  }

  function sendError(res, status, code, message, close) {
    send(res, status, close ? { ...JSON_HEADERS, connection: 'close' } : JSON_HEADERS, errorBody(code, message));
  }

  function makeEvent(req, body) {
    const url = req.url;
    const q = url.indexOf('?');
    let rawPath = q === -1 ? url : url.slice(0, q);
    if (rawPath.startsWith(prefix)) {
      const rest = rawPath.slice(prefix.length);
      if (rest === '') rawPath = '/';
      else if (rest[0] === '/') rawPath = rest;
    }
    const query = {};
    if (q !== -1) {
      for (const [key, value] of new URLSearchParams(url.slice(q + 1))) {
        if (!(key in query)) query[key] = value;
      }
    }
    const request = { method: req.method, url, path: safeDecode(rawPath), headers: req.headers, query, body };
    const structured = structuredEvent(body, req.headers['content-type']);
    const event = {
      data: structured ? structured.data : decodeData(body, req.headers['content-type']),
      'ce-type': '',
      'ce-source': '',
      'ce-id': '',
      'ce-time': '',
      'ce-specversion': '',
    };
    if (structured) {
      // The router's structured mode (integer or boolean extensions): attributes keep their types.
      for (const [name, value] of Object.entries(structured)) {
        if (name !== 'data' && name !== 'datacontenttype') event[`ce-${name}`] = value;
      }
    }
    for (const [key, value] of Object.entries(req.headers)) {
      if (key.startsWith('ce-')) event[key] = safeDecode(String(value));
    }
    kubelessFields(event, req.headers);
    event.extensions = { request, response: makeResponse() };
    return event;
  }

  let answered = false;

  function invoke(fn, req, res, body) {
    if (!answered) {
      answered = true; // the instance's first call: the router counts a cold start
      res.setHeader('X-Lambdabus-Cold-Start', 'true');
    }
    const state = { id: invocationId(req.headers) };
    return invocations.run(state, () =>
      callFunction(fn, req, res, body).finally(() => {
        for (const finish of tagged) finish(state);
      }),
    );
  }

  async function callFunction(fn, req, res, body) {
    let event;
    try {
      event = makeEvent(req, body);
    } catch (err) {
      if (err instanceof InvalidJSON) return sendError(res, 400, 'invalid_json', err.message);
      throw err;
    }
    let timer;
    const timedOut = new Promise((resolve) => {
      timer = setTimeout(resolve, timeoutMs, TIMED_OUT);
    });
    try {
      const call = (async () => fn(event, { ...context }))();
      const result = await Promise.race([call, timedOut]);
      if (result === TIMED_OUT) {
        const message = `the function did not finish within ${options.timeout} s`;
        log(`function_timeout: ${req.method} ${event.extensions.request.path}: ${message} (it cannot be stopped and runs on)`);
        call.catch(() => {});
        return sendError(res, 504, 'function_timeout', message);
      }
      const [status, headers, payload] = encodeResult(withResponse(result, event.extensions.response));
      send(res, status, headers, payload);
    } catch (err) {
      if (err instanceof InvalidJSON) return sendError(res, 400, 'invalid_json', err.message);
      process.stderr.write(`${(err && err.stack) || String(err)}\n`);
      sendError(res, 500, 'function_error', describe(err));
    } finally {
      clearTimeout(timer);
    }
  }

  return loadMain(options.code, options.entrypoint, options.handler).then(
    (fn) => {
      tagStream(process.stdout, 'stdout');
      tagStream(process.stderr, 'stderr');
      const server = http.createServer({ maxHeaderSize: MAX_HEAD }, (req, res) => {
        if (req.url === '/healthz' && (req.method === 'GET' || req.method === 'HEAD')) {
          req.resume();
          return send(res, 200, JSON_HEADERS, '{"status":"ok"}');
        }
        // A body over the limit is answered at once and then read and dropped (not cut off:
        // closing on unread data resets the connection, which can destroy the answer).
        const declared = Number(req.headers['content-length'] || 0);
        if (declared > options.maxBody) {
          req.resume();
          return sendError(res, 413, 'body_too_large', `the body exceeds ${options.maxBody} bytes`);
        }
        const chunks = [];
        let size = 0;
        let tooLarge = false;
        req.on('data', (chunk) => {
          if (tooLarge) return;
          size += chunk.length;
          if (size > options.maxBody) {
            tooLarge = true;
            chunks.length = 0;
            sendError(res, 413, 'body_too_large', `the body exceeds ${options.maxBody} bytes`);
          } else {
            chunks.push(chunk);
          }
        });
        req.on('end', () => {
          if (tooLarge) return;
          invoke(fn, req, res, Buffer.concat(chunks, size)).catch((err) => {
            log(`internal error: ${(err && err.stack) || err}`);
            sendError(res, 500, 'internal_error', describe(err), true);
          });
        });
        req.on('error', () => {});
      });
      server.keepAliveTimeout = IDLE_TIMEOUT_MS;
      server.on('clientError', (err, socket) => {
        if (!socket.writable) return socket.destroy();
        const status = err.code === 'HPE_HEADER_OVERFLOW' ? 431 : 400;
        const code = status === 431 ? 'headers_too_large' : 'bad_request';
        const body = errorBody(code, err.code || 'malformed request');
        socket.end(
          `HTTP/1.1 ${status} ${http.STATUS_CODES[status]}\r\nContent-Type: application/json\r\n` +
            `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
        );
      });
      server.on('error', (err) => {
        const where = options.socket || `${options.host}:${options.port}`;
        log(`cannot listen on ${where}: ${err.message}`);
        process.exit(EXIT_BIND_ERROR);
      });
      if (options.socket) {
        try {
          require('fs').unlinkSync(options.socket); // left by a previous run of this instance
        } catch (err) {
          if (err.code !== 'ENOENT') throw err;
        }
        server.listen({ path: options.socket, backlog: 1024 }, () => {
          require('fs').chmodSync(options.socket, 0o600);
          process.stdout.write(`{"event": "listening", "socket": ${JSON.stringify(options.socket)}}\n`);
        });
      } else {
        server.listen({ port: options.port, host: options.host }, () => {
          process.stdout.write(`{"event": "listening", "port": ${server.address().port}}\n`);
        });
      }
      const shutdown = () => {
        if (draining) return;
        draining = true;
        server.close(() => process.exit(0));
        server.closeIdleConnections();
        setTimeout(() => {
          log(`requests still running after ${DRAIN_GRACE_MS / 1000} s; cut off`);
          process.exit(0);
        }, DRAIN_GRACE_MS).unref();
      };
      process.on('SIGTERM', shutdown);
      process.on('SIGINT', shutdown);
    },
    (err) => {
      process.stderr.write(`${(err && err.stack) || String(err)}\n`);
      log(`loading ${options.entrypoint} failed: ${describe(err)}`);
      process.exit(EXIT_IMPORT_ERROR);
    },
  );
}

if (process.argv[2] === '--pool') {
  warmUp().then(() => {
    pooled();
    main();
  });
} else {
  main();
}
