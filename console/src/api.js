// The public management API, and nothing else: every call here is a route of /v1/openapi.json.

const TOKEN_KEY = "lambdabus.token";
const NS_KEY = "lambdabus.namespace";

export const session = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY);
  },
  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
  get namespace() {
    return sessionStorage.getItem(NS_KEY) || "default";
  },
  set namespace(value) {
    sessionStorage.setItem(NS_KEY, value);
  },
};

/**
 * `#token=...` (the link `make run` prints): kept in sessionStorage, gone from the address bar.
 * A link never replaces a token this tab already holds (someone else's link would sign the user
 * in as someone else): that needs signing out first. Returns a problem to show, or null.
 */
export function takeTokenFromFragment() {
  const match = /^#token=([^&]*)/.exec(location.hash);
  if (!match) return null;
  history.replaceState(null, "", location.pathname + location.search + "#/functions");
  let token;
  try {
    token = decodeURIComponent(match[1]).trim();
  } catch {
    return "The sign-in link is damaged: paste the token instead.";
  }
  if (!token) return null;
  if (session.token && session.token !== token)
    return `This tab is signed in with ${tokenId(session.token)}; sign out before using a link for ${tokenId(token)}.`;
  session.token = token;
  return null;
}

/** What may be shown of a token: `lbt_<id>`, never its secret. */
export function tokenId(token) {
  const match = /^(lbt_[0-9a-f]{16})_/.exec(token ?? "");
  return match ? match[1] : "a token";
}

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

// No cookie is ever sent or taken (a function's answer relayed on this origin must not set one
// that the API then sees), and no redirect is followed with the token.
const BASE = { credentials: "omit", redirect: "manual" };

function headers(extra = {}) {
  const all = { Accept: "application/json", ...extra };
  if (session.token) all.Authorization = `Bearer ${session.token}`;
  return all;
}

async function fail(response) {
  let code = `http_${response.status}`;
  let message = `${response.status} ${response.statusText}`;
  let details;
  try {
    const body = await response.json();
    if (body?.error) ({ code, message, details } = { ...body.error, code: body.error.code ?? code });
  } catch {
    /* not JSON: keep the status line */
  }
  if (response.status === 401) window.dispatchEvent(new CustomEvent("lambdabus:unauthenticated"));
  return new ApiError(response.status, code, message, details);
}

export async function call(method, path, { json, body, contentType, extraHeaders, signal, withEtag } = {}) {
  const init = { ...BASE, method, headers: headers(extraHeaders), signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = contentType ?? "application/json";
  } else if (body !== undefined) {
    init.body = body;
    if (contentType) init.headers["Content-Type"] = contentType;
  }
  const response = await fetch(path, init);
  if (response.type === "opaqueredirect") throw new ApiError(0, "redirected", `${path} answered a redirect`);
  if (!response.ok) throw await fail(response);
  if (withEtag) return { body: await response.json(), etag: response.headers.get("ETag") };
  const type = response.headers.get("Content-Type") ?? "";
  return type.includes("json") ? response.json() : response.text();
}

export const get = (path, options) => call("GET", path, options);

export const fn = (ns, name, rest = "") =>
  `/v1/namespaces/${encodeURIComponent(ns)}/functions/${encodeURIComponent(name)}${rest}`;
export const nsPath = (ns, rest) => `/v1/namespaces/${encodeURIComponent(ns)}${rest}`;

/** An invocation through the gateway: status, headers, body and duration as the caller saw them. */
export async function invoke(ns, name, { body, headers: sent }) {
  const started = performance.now();
  const response = await fetch(fn(ns, name, "/invoke"), {
    ...BASE,
    method: "POST",
    headers: { ...sent, ...headers({}) },
    body,
  });
  if (response.type === "opaqueredirect")
    return { status: 0, statusText: "a redirect (not followed)", headers: [], body: "", ms: performance.now() - started };
  const text = await response.text();
  return {
    status: response.status,
    statusText: response.statusText,
    headers: [...response.headers.entries()],
    body: text,
    ms: performance.now() - started,
  };
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => (clearTimeout(timer), resolve()), { once: true });
  });

async function* chunks(response, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  try {
    while (!signal.aborted) {
      const { value, done } = await reader.read();
      if (done) return;
      yield decoder.decode(value, { stream: true });
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/**
 * Read a stream of records, split by `separator`, and read it again after a drop (1 s later):
 * `open()` asks from where the last one stopped; `take(piece)` handles one record. A 4xx other
 * than 429 ends it (the state says why); a 5xx, a dropped connection or a network error does not.
 */
function resumable({ open, separator, take, onState }) {
  const stop = new AbortController();
  (async () => {
    while (!stop.signal.aborted) {
      try {
        const response = await open(stop.signal);
        if (!response.ok) throw await fail(response);
        onState?.("live");
        let buffer = "";
        for await (const text of chunks(response, stop.signal)) {
          buffer += text;
          let end;
          while ((end = buffer.indexOf(separator)) >= 0) {
            const piece = buffer.slice(0, end);
            buffer = buffer.slice(end + separator.length);
            take(piece);
          }
        }
      } catch (error) {
        if (stop.signal.aborted) return;
        onState?.(error instanceof ApiError ? `error: ${error.message}` : "reconnecting");
        if (error instanceof ApiError && error.status < 500 && error.status !== 429) return;
      }
      if (!stop.signal.aborted) {
        onState?.("reconnecting");
        await sleep(1000, stop.signal);
      }
    }
  })();
  return () => stop.abort();
}

/**
 * Follow a log (`?follow=1`, NDJSON), reconnecting after a drop: it asks again from the last
 * line's time and drops the lines it had shown already, so nothing is lost or shown twice.
 */
export function followLog(path, { onLine, onState, tail = 500 }) {
  let lastTs = null;
  let seenAtLast = new Set();
  return resumable({
    open: (signal) => {
      const query = lastTs ? `since=${encodeURIComponent(lastTs)}` : `tail=${tail}`;
      return fetch(`${path}?follow=1&${query}`, { ...BASE, headers: headers(), signal });
    },
    separator: "\n",
    take: (text) => {
      const raw = text.trim();
      if (!raw) return; // keep-alive
      const line = JSON.parse(raw);
      if (lastTs !== null && line.ts < lastTs) return;
      if (line.ts === lastTs && seenAtLast.has(raw)) return;
      if (line.ts !== lastTs) seenAtLast = new Set();
      lastTs = line.ts;
      seenAtLast.add(raw);
      onLine(line);
    },
    onState,
  });
}

/** The lifecycle stream (SSE over fetch, so the token stays in a header); resumes by `Last-Event-ID`. */
export function followLifecycle(query, { onEvent, onState }) {
  let lastId = null;
  return resumable({
    open: (signal) =>
      fetch(`/v1/lifecycle?${query}`, {
        ...BASE,
        headers: headers({ Accept: "text/event-stream", ...(lastId ? { "Last-Event-ID": lastId } : {}) }),
        signal,
      }),
    separator: "\n\n",
    take: (frame) => {
      let id = null;
      const data = [];
      for (const line of frame.split("\n")) {
        if (line.startsWith("id: ")) id = line.slice(4);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      if (!data.length) return; // a comment: keep-alive
      if (id !== null) lastId = id;
      onEvent(JSON.parse(data.join("\n")), id);
    },
    onState,
  });
}
