// The functions of a namespace, and a new function from inline code or an archive.
import { call, fn, get, nsPath, session } from "./api.js";
import { badge, field, form, h, onAbort, replace, table, toast } from "./dom.js";

const CONDITIONS = ["ConfigurationReady", "BuildReady", "Running"];

export function conditionBadges(conditions = []) {
  return h(
    "span",
    { class: "conditions" },
    CONDITIONS.map((type) => {
      const c = conditions.find((x) => x.type === type);
      const state = c?.status ?? "Unknown";
      return h("span", { class: `badge ${state === "True" ? "ok" : state === "False" ? "bad" : "wait"}`, title: c?.message || c?.reason || "" }, `${type}: ${state}`);
    }),
  );
}

export async function functionsView(main, { signal }) {
  const ns = session.namespace;
  const body = h("div", { class: "loading" }, "Loading…");
  replace(
    main,
    h("div", { class: "heading" }, h("h1", {}, `Functions in ${ns}`), h("a", { class: "button", href: "#/new" }, "New function")),
    body,
  );
  const render = async () => {
    const { items } = await get(nsPath(ns, "/functions"));
    const statuses = await Promise.all(
      items.map((f) => get(fn(ns, f.name, "/status")).catch(() => null)),
    );
    const rows = items.map((f, i) => {
      const s = statuses[i];
      return h(
        "tr",
        { dataset: { function: f.name } },
        h("td", {}, h("a", { href: `#/fn/${encodeURIComponent(f.name)}` }, f.name)),
        h("td", {}, f.spec.runtime),
        h("td", {}, s ? badge(s.image_status) : "?"),
        h("td", {}, s ? badge(s.status) : "?"),
        h("td", {}, s ? conditionBadges(s.conditions) : ""),
        h("td", { class: "num" }, s ? `${s.ready_replicas}/${s.replicas}` : ""),
        h("td", { class: "description" }, f.spec.description ?? ""),
      );
    });
    replace(body, table(["Name", "Runtime", "Image", "Lambda", "Conditions", "Ready", "Description"], rows));
  };
  await render();
  const timer = setInterval(() => render().catch(() => {}), 3000);
  onAbort(signal, () => clearInterval(timer));
}

const TEMPLATES = {
  "python3.11": ["handler.py", 'def main(event, context):\n    return {"hello": event.get("data") or "world"}\n'],
  nodejs20: ["handler.js", 'module.exports = {\n  main: async (event, context) => ({ hello: event.data || "world" }),\n};\n'],
};

export async function newFunctionView(main) {
  const ns = session.namespace;
  const { createEditor } = await import("./editor.js");
  const name = h("input", { name: "name", required: true, pattern: "[a-z]([-a-z0-9]*[a-z0-9])?", maxLength: 63, autocomplete: "off" });
  const runtime = h("select", { name: "runtime" }, Object.keys(TEMPLATES).map((r) => h("option", { value: r }, r)));
  const handler = h("input", { name: "handler", placeholder: "handler.main (the runtime's default)" });
  const description = h("input", { name: "description", maxLength: 256 });
  const editorHost = h("div", { class: "editor" });
  const editor = createEditor(editorHost, {
    text: TEMPLATES["python3.11"][1],
    runtime: "python3.11",
    label: "Source of the entry file",
  });
  runtime.addEventListener("change", () => editor.reset(TEMPLATES[runtime.value][1], runtime.value));
  let archive = null;
  const dropLabel = h("span", {}, "…or drop a .zip / .tar.gz here (it replaces the code above)");
  const file = h("input", { type: "file", name: "archive", accept: ".zip,.tar,.tar.gz,.tgz" });
  const drop = h(
    "div",
    { class: "drop" },
    field("Archive", file),
    dropLabel,
  );
  const pick = (f) => {
    archive = f;
    dropLabel.textContent = f ? `archive: ${f.name} (${f.size} bytes)` : "";
  };
  file.addEventListener("change", () => pick(file.files[0] ?? null));
  drop.addEventListener("dragover", (e) => (e.preventDefault(), drop.classList.add("over")));
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pick(e.dataTransfer.files[0] ?? null);
  });
  const submit = async () => {
    const spec = { name: name.value.trim(), runtime: runtime.value };
    if (handler.value.trim()) spec.handler = handler.value.trim();
    if (description.value.trim()) spec.description = description.value.trim();
    if (archive) {
      const data = new FormData();
      data.append("spec", new Blob([JSON.stringify(spec)], { type: "application/json" }), "spec.json");
      data.append("archive", archive, archive.name);
      await call("POST", nsPath(ns, "/functions"), { body: data });
    } else {
      const [entry] = TEMPLATES[runtime.value];
      await call("POST", nsPath(ns, "/functions"), {
        json: { ...spec, source: { files: { [entry]: editor.text } } },
      });
    }
    toast(`${spec.name} created; building`);
    location.hash = `#/fn/${encodeURIComponent(spec.name)}/build`;
  };
  const fields = [
    field("Name", name, "lowercase letters, digits and '-'"),
    field("Runtime", runtime),
    field("Handler", handler),
    field("Description", description),
    h("div", { class: "field" }, h("span", { class: "label" }, "Code"), editorHost),
    drop,
  ];
  replace(main, h("h1", {}, `New function in ${ns}`), form({ fields, label: "Create", submit, className: "stack" }));
  name.focus();
}
