// The only way the console builds DOM: every string becomes a text node or a property value,
// never markup, so nothing an API returns (a description, a log line) can run as HTML.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2).toLowerCase(), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

let fieldIds = 0;

/** A labelled form field: the label names the control for screen readers and axe. */
export function field(label, control, hint) {
  control.id ||= `f${++fieldIds}`;
  const parts = [h("label", { for: control.id }, label), control];
  if (hint) {
    const hintId = `${control.id}-hint`;
    control.setAttribute("aria-describedby", hintId);
    parts.push(h("small", { id: hintId, class: "hint" }, hint));
  }
  return h("div", { class: "field" }, parts);
}

export function badge(text, tone) {
  return h("span", { class: `badge ${tone ?? toneOf(text)}` }, text);
}

export function toneOf(value) {
  const v = String(value).toLowerCase();
  if (["running", "ready", "true", "succeeded", "completed", "delivered"].includes(v)) return "ok";
  if (["failed", "false", "error", "crashloop", "build_failed", "deploy_failed"].some((s) => v.includes(s)))
    return "bad";
  return "wait";
}

export function time(value) {
  if (!value) return "";
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? String(value) : d.toLocaleString();
}

export function table(headers, rows, caption) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      {},
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
      h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colSpan: headers.length, class: "empty" }, "Nothing yet."))),
    ),
  );
}

let toastTimer;
export function toast(message, tone = "ok") {
  const el = document.getElementById("toast");
  el.className = `show ${tone}`;
  el.textContent = message;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.className = ""), 6000);
}

/** Run `cleanup` when the view is left: now, if it was left while the view was still loading. */
export function onAbort(signal, cleanup) {
  if (signal.aborted) cleanup();
  else signal.addEventListener("abort", cleanup, { once: true });
}

/** A form card whose submit is async: the button waits, a failure is shown in the form. */
export function form({ title, fields, label, submit, className = "stack card" }) {
  const error = h("p", { class: "error", role: "alert" });
  const button = h("button", { type: "submit" }, label);
  return h(
    "form",
    {
      class: className,
      onsubmit: async (e) => {
        e.preventDefault();
        error.textContent = "";
        button.disabled = true;
        try {
          await submit();
        } catch (err) {
          error.textContent = `${err.code ?? "error"}: ${err.message}`;
        } finally {
          button.disabled = false;
        }
      },
    },
    title ? h("h2", {}, title) : null,
    fields,
    error,
    h("div", {}, button),
  );
}

/** `KEY=value` lines into an object without a prototype (`__proto__` is a key like any other). */
export function keyValues(text, what) {
  const out = Object.create(null);
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line) continue;
    const at = line.indexOf("=");
    if (at <= 0) throw new Error(`${what}: '${line}' is not KEY=value`);
    out[line.slice(0, at).trim()] = line.slice(at + 1);
  }
  return out;
}

/** A button that runs an API action, says what it did (or why it failed) and may redraw. */
export function action(text, { label, run, done, quiet = true, disabled = false }) {
  return h(
    "button",
    {
      type: "button",
      class: quiet ? "quiet" : null,
      "aria-label": label,
      disabled,
      onclick: async () => {
        try {
          await run();
        } catch (err) {
          toast(err.message, "bad");
          return;
        }
        if (done) toast(done);
      },
    },
    text,
  );
}
