// One function: status, build log, invoke, runtime logs, settings, revisions and traffic,
// metrics and (LUNA) docs.
import uPlot from "uplot";
import { call, fn, followLog, get, invoke, session } from "./api.js";
import { action, badge, field, form, h, keyValues, onAbort, replace, table, time, toast } from "./dom.js";
import { conditionBadges } from "./functions.js";

const TABS = [
  ["overview", "Overview"],
  ["build", "Build log"],
  ["invoke", "Invoke"],
  ["logs", "Logs"],
  ["settings", "Settings"],
  ["revisions", "Revisions"],
  ["metrics", "Metrics"],
  ["docs", "Docs"],
];

export async function functionView(main, { name, tab = "overview", signal }) {
  const ns = session.namespace;
  const { body: record, etag } = await call("GET", fn(ns, name), { withEtag: true, signal });
  const statusLine = h("div", { class: "status-line", "aria-live": "polite" });
  const refresh = async () => {
    const s = await get(fn(ns, name, "/status")).catch((e) => ({ error: e }));
    if (s.error) return replace(statusLine, badge(s.error.message, "bad"));
    replace(
      statusLine,
      h("span", { dataset: { imageStatus: s.image_status } }, "Image ", badge(s.image_status)),
      h("span", { dataset: { lambdaStatus: s.status } }, "Lambda ", badge(s.status)),
      conditionBadges(s.conditions),
      h("span", {}, `generation ${s.generation}, ${s.ready_replicas}/${s.replicas} ready`),
      s.message ? h("span", { class: "muted" }, s.message) : null,
    );
  };
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 1500);
  onAbort(signal, () => clearInterval(timer));
  const panel = h("section", { class: "panel", id: "panel", "aria-labelledby": `tab-${tab}` });
  replace(
    main,
    h("div", { class: "heading" }, h("h1", {}, name), h("span", { class: "muted" }, `${ns} · ${record.spec.runtime}`)),
    statusLine,
    h(
      "nav",
      { class: "tabs", "aria-label": "Function sections" },
      TABS.map(([id, label]) =>
        h("a", { href: `#/fn/${encodeURIComponent(name)}/${id}`, id: `tab-${id}`, "aria-current": id === tab ? "page" : null }, label),
      ),
    ),
    panel,
  );
  const views = { overview, build, invokeTab, logs, settings, revisions, metrics, docs };
  const view = views[tab === "invoke" ? "invokeTab" : tab] ?? overview;
  await view(panel, { ns, name, record, etag, signal, refresh });
}

function overview(panel, { record }) {
  const s = record.spec;
  const rows = [
    ["Description", s.description ?? ""],
    ["Runtime", s.runtime],
    ["Handler", s.handler ?? "(default)"],
    ["Memory", `${s.memory} MiB`],
    ["CPU", `${s.cpu}m`],
    ["Timeout", `${s.timeout} s`],
    ["Scale", s.scale ? `${s.scale.min}–${s.scale.max}, target ${s.scale.target}, idle ${s.scale.idle_seconds} s` : `${s.replicas} fixed`],
    ["Labels", Object.entries(s.labels ?? {}).map(([k, v]) => `${k}=${v}`).join(", ")],
    ["Env", [...Object.keys(s.env ?? {}), ...Object.entries(s.env_from ?? {}).map(([k, ref]) => `${k} (from secret ${ref.secret}, key ${ref.key})`)].join(", ")],
    ["Secrets", (s.secrets ?? []).join(", ")],
    ["Created", time(record.created_at)],
    ["Updated", time(record.updated_at)],
  ];
  const shown = rows.filter(([, v]) => v !== "" && v !== undefined);
  replace(panel, h("dl", { class: "facts" }, shown.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
}

function logView(panel, path, signal, label) {
  const state = h("span", { class: "badge wait" }, "connecting");
  const out = h("pre", { class: "log", tabIndex: 0, "aria-label": label, "aria-live": "off" });
  replace(panel, h("div", { class: "heading" }, h("h2", {}, label), state), out);
  const stop = followLog(path, {
    onLine: (line) => {
      const stick = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
      out.append(
        h(
          "div",
          { class: `line ${line.stream}` },
          h("time", {}, new Date(line.ts).toLocaleTimeString()),
          " ",
          line.instance ? h("span", { class: "muted" }, `${line.instance} `) : null,
          line.line,
        ),
      );
      if (stick) out.scrollTop = out.scrollHeight;
    },
    onState: (s) => {
      state.textContent = s;
      state.className = `badge ${s === "live" ? "ok" : "wait"}`;
    },
  });
  onAbort(signal, stop);
}

function build(panel, { ns, name, signal }) {
  logView(panel, fn(ns, name, "/build/logs"), signal, "Build log");
}

function logs(panel, { ns, name, signal }) {
  logView(panel, fn(ns, name, "/logs"), signal, "Runtime log");
}

function invokeTab(panel, { ns, name }) {
  const body = h("textarea", { rows: 6, name: "body", spellcheck: false }, '{"data": "console"}');
  const headers = h("textarea", { rows: 3, name: "headers", spellcheck: false }, "Content-Type: application/json");
  const result = h("div", { class: "result", "aria-live": "polite" });
  const send = h("button", { type: "submit" }, "Invoke");
  const form = h(
    "form",
    {
      class: "stack",
      onsubmit: async (e) => {
        e.preventDefault();
        send.disabled = true;
        const sent = {};
        for (const line of headers.value.split("\n")) {
          const at = line.indexOf(":");
          if (at > 0) sent[line.slice(0, at).trim()] = line.slice(at + 1).trim();
        }
        try {
          const r = await invoke(ns, name, { body: body.value, headers: sent });
          replace(
            result,
            h("p", {}, badge(`${r.status} ${r.statusText}`, r.status < 400 ? "ok" : "bad"), ` in ${r.ms.toFixed(1)} ms`),
            h("h3", {}, "Headers"),
            h("pre", { class: "headers" }, r.headers.map(([k, v]) => `${k}: ${v}`).join("\n")),
            h("h3", {}, "Body"),
            h("pre", { class: "response-body" }, r.body),
          );
        } catch (err) {
          replace(result, h("p", { class: "error", role: "alert" }, String(err.message)));
        } finally {
          send.disabled = false;
        }
      },
    },
    field("Headers (one 'Name: value' a line)", headers),
    field("Body", body),
    h("div", {}, send),
  );
  replace(panel, form, result);
}

function lines(object) {
  return Object.entries(object ?? {}).map(([k, v]) => `${k}=${v}`).join("\n");
}

/** A merge patch (RFC 7386) of a map: new and changed keys, and null for the removed ones. */
function mapPatch(before, after) {
  const patch = Object.assign(Object.create(null), after);
  for (const key of Object.keys(before ?? {})) if (!Object.hasOwn(after, key)) patch[key] = null;
  return patch;
}

function settings(panel, { ns, name, record, etag }) {
  const s = record.spec;
  const env = h("textarea", { rows: 5, name: "env", spellcheck: false }, lines(s.env));
  const labels = h("textarea", { rows: 3, name: "labels", spellcheck: false }, lines(s.labels));
  const secrets = h("input", { name: "secrets", value: (s.secrets ?? []).join(", ") });
  const autoscale = h("input", { type: "checkbox", name: "autoscale", checked: Boolean(s.scale) });
  const num = (n, value, attrs = {}) => h("input", { type: "number", name: n, value: String(value), ...attrs });
  const replicas = num("replicas", s.replicas, { min: 0, max: 64 });
  const min = num("min", s.scale?.min ?? 0, { min: 0, max: 64 });
  const max = num("max", s.scale?.max ?? 10, { min: 1, max: 64 });
  const target = num("target", s.scale?.target ?? 10, { min: 0.1, step: "any" });
  const idle = num("idle", s.scale?.idle_seconds ?? 60, { min: 1 });
  const memory = num("memory", s.memory, { min: 16 });
  const timeout = num("timeout", s.timeout, { min: 0.1, step: "any" });
  const submit = async () => {
    const patch = {
      env: mapPatch(s.env, keyValues(env.value, "env")),
      labels: mapPatch(s.labels, keyValues(labels.value, "labels")),
      secrets: secrets.value.split(",").map((x) => x.trim()).filter(Boolean),
      memory: Number(memory.value),
      timeout: Number(timeout.value),
    };
    if (autoscale.checked)
      patch.scale = { min: Number(min.value), max: Number(max.value), target: Number(target.value), idle_seconds: Number(idle.value) };
    else Object.assign(patch, { scale: null, replicas: Number(replicas.value) });
    // If-Match: an edit made meanwhile (elsewhere) is not overwritten; the API says so
    await call("PATCH", fn(ns, name), {
      json: patch,
      contentType: "application/merge-patch+json",
      extraHeaders: etag ? { "If-Match": etag } : {},
    });
    toast("saved; rolling out");
    location.hash = `#/fn/${encodeURIComponent(name)}/overview`;
  };
  const fields = [
    field("Environment (KEY=value a line)", env),
    field("Secrets used (names, comma-separated)", secrets, "mounted as /secrets/<name>/<key>"),
    field("Labels (key=value a line)", labels),
    h(
      "fieldset",
      {},
      h("legend", {}, "Scale"),
      h("div", { class: "check" }, autoscale, h("label", { for: (autoscale.id = "autoscale") }, "Autoscale on concurrency")),
      h("div", { class: "row" }, field("Fixed replicas", replicas), field("Min", min), field("Max", max), field("Target in flight", target), field("Idle seconds", idle)),
    ),
    h("div", { class: "row" }, field("Memory (MiB)", memory), field("Timeout (s)", timeout)),
  ];
  replace(panel, form({ fields, label: "Save", submit, className: "stack" }));
}

async function revisions(panel, { ns, name, signal }) {
  const render = async () => {
    const [{ items }, route] = await Promise.all([get(fn(ns, name, "/revisions")), get(fn(ns, name, "/traffic"))]);
    const sliders = new Map();
    const sum = h("output", {}, "");
    const total = () => {
      const t = [...sliders.values()].reduce((a, s) => a + Number(s.value), 0);
      sum.textContent = `total ${t}%`;
      sum.className = t === 100 ? "ok" : "bad";
    };
    const rows = items.map((r) => {
      const slider = h("input", {
        type: "range",
        min: 0,
        max: 100,
        step: 1,
        value: String(r.traffic_percent ?? 0),
        // a revision that is not running yet may get traffic: the deployer starts it, and the
        // route keeps its share on the ready ones until it is (the route's conditions say so)
        "aria-label": `Traffic to ${r.name}`,
      });
      const shown = h("output", {}, `${r.traffic_percent ?? 0}%`);
      slider.addEventListener("input", () => ((shown.textContent = `${slider.value}%`), total()));
      sliders.set(r.name, slider);
      return h(
        "tr",
        { dataset: { revision: r.name } },
        h("td", {}, r.name),
        h("td", {}, time(r.created)),
        h("td", {}, badge(r.ready ? "ready" : r.status ?? "not ready")),
        h("td", {}, (r.tags ?? []).join(", ")),
        h("td", { class: "slider" }, slider, shown),
        h(
          "td",
          {},
          action("Delete", {
            label: `Delete revision ${r.name}`,
            disabled: (r.traffic_percent ?? 0) > 0,
            run: async () => {
              await call("DELETE", fn(ns, name, `/revisions/${encodeURIComponent(r.name)}`));
              await render();
            },
            done: `${r.name} deleted`,
          }),
        ),
      );
    });
    total();
    const apply = async (traffic) => {
      try {
        await call("PUT", fn(ns, name, "/traffic"), { json: { traffic } });
        toast("traffic set");
        await render();
      } catch (err) {
        toast(err.message, "bad");
      }
    };
    const previous = rollbackTarget(items);
    replace(
      panel,
      h("p", {}, `Latest ready: ${route.latest_ready_revision ?? "none"} · latest created: ${route.latest_created_revision ?? "none"}`),
      table(["Revision", "Created", "State", "Tags", "Traffic", ""], rows, "Revisions and their share of the traffic"),
      h(
        "div",
        { class: "row" },
        sum,
        h(
          "button",
          {
            type: "button",
            onclick: () =>
              apply([...sliders].filter(([, s]) => Number(s.value) > 0).map(([revision, s]) => ({ revision, percent: Number(s.value) }))),
          },
          "Apply traffic",
        ),
        h(
          "button",
          { type: "button", class: "quiet", disabled: !previous, onclick: () => apply([{ revision: previous.name, percent: 100 }]) },
          previous ? `Roll back to ${previous.name}` : "Nothing to roll back to",
        ),
      ),
      h("h3", {}, "URLs"),
      h("ul", {}, Object.entries(route.urls ?? {}).map(([tag, url]) => h("li", {}, `${tag}: `, h("code", {}, url)))),
    );
  };
  await render();
}

/** What `lambdabus rollback` picks: the newest ready revision before the latest ready one (an
 * older one that is not ready at this instant when none is). */
export function rollbackTarget(items) {
  const sorted = [...items].sort((a, b) => a.generation - b.generation);
  const ready = sorted.map((r, i) => (r.ready ? i : -1)).filter((i) => i >= 0);
  const latest = ready.length ? ready[ready.length - 1] : sorted.length - 1;
  const older = ready.filter((i) => i < latest);
  const pick = older.length ? older[older.length - 1] : latest - 1;
  return pick >= 0 ? sorted[pick] : null;
}

async function metrics(panel, { ns, name, signal }) {
  const series = { t: [], calls: [], errors: [], p50: [], p99: [] };
  const summary = h("p", { "aria-live": "polite" });
  const host1 = h("div", { class: "chart", role: "img", "aria-label": "Calls and errors per minute" });
  const host2 = h("div", { class: "chart", role: "img", "aria-label": "Duration p50 and p99 in ms" });
  replace(panel, summary, h("h3", {}, "Calls and errors (last minute)"), host1, h("h3", {}, "Duration (ms, last minute)"), host2);
  const width = () => Math.max(280, Math.min(panel.clientWidth || 800, 1100));
  const opts = (title, a, b) => ({
    width: width(),
    height: 200,
    // the last five minutes, whatever the points so far
    scales: { x: { time: true, range: () => [Date.now() / 1000 - 300, Date.now() / 1000] } },
    series: [{}, { label: a, stroke: "#4e79a7", width: 2 }, { label: b, stroke: "#e15759", width: 2 }],
    axes: [{ stroke: "currentColor" }, { stroke: "currentColor" }],
    title,
  });
  const chart1 = new uPlot(opts("calls", "calls", "errors"), [[], [], []], host1);
  const chart2 = new uPlot(opts("duration", "p50 ms", "p99 ms"), [[], [], []], host2);
  const poll = async () => {
    const m = await get(fn(ns, name, "/metrics"));
    const w = m.windows?.["1m"] ?? Object.values(m.windows ?? {})[0] ?? {};
    series.t.push(Date.now() / 1000);
    series.calls.push(w.calls ?? 0);
    series.errors.push(w.errors ?? 0);
    series.p50.push(w.p50_ms ?? null);
    series.p99.push(w.p99_ms ?? null);
    for (const k of Object.keys(series)) if (series[k].length > 300) series[k].shift();
    summary.textContent = Object.entries(m.windows ?? {})
      .map(([k, v]) => `${k}: ${v.calls} calls, ${v.errors} errors, p50 ${v.p50_ms ?? "–"} ms, p99 ${v.p99_ms ?? "–"} ms`)
      .join(" · ");
    chart1.setData([series.t, series.calls, series.errors]);
    chart2.setData([series.t, series.p50, series.p99]);
  };
  await poll();
  const timer = setInterval(() => poll().catch(() => {}), 2000);
  onAbort(signal, () => (clearInterval(timer), chart1.destroy(), chart2.destroy()));
}

async function docs(panel, { ns, name }) {
  let html;
  try {
    html = await get(fn(ns, name, "/docs"), { extraHeaders: { Accept: "text/html" } });
  } catch (err) {
    replace(panel, h("p", {}, err.status === 404 ? "This function has no docs/lambda.html." : err.message));
    return;
  }
  // The function's own page: in a sandbox without scripts, same-origin access or forms.
  replace(panel, h("iframe", { class: "docs", sandbox: "", title: `Documentation of ${name}`, srcdoc: html }));
}
