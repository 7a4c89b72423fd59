// Triggers (and publishing an event), schedules, dead letters, the lifecycle stream.
import { call, followLifecycle, get, nsPath, session } from "./api.js";
import { action, badge, field, form, h, onAbort, replace, table, time, toast } from "./dom.js";

async function functionOptions(ns) {
  const { items } = await get(nsPath(ns, "/functions"));
  return items.map((f) => h("option", { value: f.name }, f.name));
}

function deleteButton(path, what, after) {
  return action("Delete", {
    label: `Delete ${what}`,
    run: async () => {
      await call("DELETE", path);
      await after();
    },
    done: `${what} deleted`,
  });
}

function jsonObject(text, what) {
  if (!text.trim()) return {};
  let value;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new Error(`${what} is not JSON: ${err.message}`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) throw new Error(`${what} must be a JSON object`);
  return value;
}

export async function triggersView(main) {
  const ns = session.namespace;
  const list = h("div");
  const render = async () => {
    const { items } = await get(nsPath(ns, "/triggers"));
    replace(
      list,
      table(
        ["Name", "Function", "Filter", "Retries", ""],
        items.map((t) =>
          h(
            "tr",
            { dataset: { trigger: t.name } },
            h("td", {}, t.name),
            h("td", {}, h("a", { href: `#/fn/${encodeURIComponent(t.function)}` }, t.function)),
            h("td", {}, h("code", {}, JSON.stringify(t.filter))),
            h("td", { class: "num" }, String(t.delivery?.retries ?? "")),
            h("td", {}, deleteButton(nsPath(ns, `/triggers/${encodeURIComponent(t.name)}`), `trigger ${t.name}`, render)),
          ),
        ),
      ),
    );
  };
  const name = h("input", { name: "trigger-name", required: true });
  const target = h("select", { name: "trigger-function", required: true }, await functionOptions(ns));
  const type = h("input", { name: "trigger-type", placeholder: "com.example.order.created" });
  const source = h("input", { name: "trigger-source", placeholder: "(any)" });
  const create = form({
    title: "New trigger",
    fields: [field("Name", name), field("Function", target), field("Event type", type), field("Event source", source)],
    label: "Create trigger",
    submit: async () => {
      const filter = {};
      if (type.value.trim()) filter.type = type.value.trim();
      if (source.value.trim()) filter.source = source.value.trim();
      await call("POST", nsPath(ns, "/triggers"), { json: { name: name.value.trim(), function: target.value, filter } });
      toast(`trigger ${name.value} created`);
      await render();
    },
  });
  const evType = h("input", { name: "event-type", required: true, placeholder: "com.example.order.created" });
  const evSource = h("input", { name: "event-source", required: true, value: "/console" });
  const evData = h("textarea", { name: "event-data", rows: 4, spellcheck: false }, '{"order": 1}');
  const publish = form({
    title: "Publish an event",
    fields: [field("Type", evType), field("Source", evSource), field("Data (JSON)", evData)],
    label: "Publish",
    submit: async () => {
      const event = {
        specversion: "1.0",
        id: crypto.randomUUID(),
        type: evType.value.trim(),
        source: evSource.value.trim(),
        datacontenttype: "application/json",
        data: evData.value.trim() ? JSON.parse(evData.value) : null,
      };
      const accepted = await call("POST", "/v1/events", { json: event, contentType: "application/cloudevents+json" });
      toast(`event ${accepted.ids?.[0] ?? event.id} published`);
    },
  });
  replace(main, h("h1", {}, `Triggers in ${ns}`), list, h("div", { class: "columns" }, create, publish));
  await render();
}

export async function schedulesView(main) {
  const ns = session.namespace;
  const list = h("div");
  const render = async () => {
    const { items } = await get(nsPath(ns, "/schedules"));
    replace(
      list,
      table(
        ["Name", "Function", "Cron", "Time zone", "Created", ""],
        items.map((s) =>
          h(
            "tr",
            { dataset: { schedule: s.name } },
            h("td", {}, s.name),
            h("td", {}, s.function),
            h("td", {}, h("code", {}, s.cron)),
            h("td", {}, s.timezone),
            h("td", {}, time(s.created_at)),
            h("td", {}, deleteButton(nsPath(ns, `/schedules/${encodeURIComponent(s.name)}`), `schedule ${s.name}`, render)),
          ),
        ),
      ),
    );
  };
  const name = h("input", { name: "schedule-name", required: true });
  const target = h("select", { name: "schedule-function", required: true }, await functionOptions(ns));
  const cron = h("input", { name: "schedule-cron", required: true, value: "*/5 * * * *" });
  const zone = h("input", { name: "schedule-timezone", value: "UTC" });
  const data = h("textarea", { name: "schedule-data", rows: 3, spellcheck: false }, "{}");
  const create = form({
    title: "New schedule",
    fields: [field("Name", name), field("Function", target), field("Cron", cron, "minute hour day month weekday"), field("Time zone", zone), field("Data (JSON object)", data)],
    label: "Create schedule",
    submit: async () => {
      await call("POST", nsPath(ns, "/schedules"), {
        json: { name: name.value.trim(), function: target.value, cron: cron.value.trim(), timezone: zone.value.trim() || "UTC", data: jsonObject(data.value, "data") },
      });
      toast(`schedule ${name.value} created`);
      await render();
    },
  });
  replace(main, h("h1", {}, `Schedules in ${ns}`), list, create);
  await render();
}

export async function deadLettersView(main) {
  const ns = session.namespace;
  const list = h("div");
  const render = async () => {
    const { items } = await get(nsPath(ns, "/deadletters"));
    replace(
      list,
      table(
        ["Id", "Trigger", "Function", "Event", "Attempts", "Last status", "Why", "When", ""],
        items.map((d) =>
          h(
            "tr",
            { dataset: { deadletter: d.id } },
            h("td", {}, d.id),
            h("td", {}, d.trigger ?? ""),
            h("td", {}, d.function),
            h("td", {}, h("code", {}, `${d.event?.type ?? ""} ${d.event?.id ?? ""}`)),
            h("td", { class: "num" }, String(d.attempts)),
            h("td", { class: "num" }, d.last_status == null ? "" : String(d.last_status)),
            h("td", {}, d.message ?? ""),
            h("td", {}, time(d.deadlettered_at)),
            h(
              "td",
              {},
              action("Redrive", {
                label: `Redrive dead letter ${d.id}`,
                quiet: false,
                run: async () => {
                  await call("POST", nsPath(ns, `/deadletters/${encodeURIComponent(d.id)}/redrive`));
                  await render();
                },
                done: `dead letter ${d.id} redriven`,
              }),
            ),
          ),
        ),
      ),
    );
  };
  replace(main, h("div", { class: "heading" }, h("h1", {}, `Dead letters in ${ns}`), h("button", { type: "button", class: "quiet", onclick: () => render() }, "Refresh")), list);
  await render();
}

export function eventsView(main, { signal }) {
  const ns = session.namespace;
  const state = h("span", { class: "badge wait" }, "connecting");
  const body = h("tbody");
  replace(
    main,
    h("div", { class: "heading" }, h("h1", {}, `Lifecycle events in ${ns}`), state),
    h(
      "div",
      { class: "table-wrap" },
      h("table", {}, h("thead", {}, h("tr", {}, ["Time", "Type", "Function", "Summary"].map((x) => h("th", { scope: "col" }, x)))), body),
    ),
  );
  const since = new Date(Date.now() - 3600_000).toISOString();
  const stop = followLifecycle(`namespace=${encodeURIComponent(ns)}&since=${encodeURIComponent(since)}`, {
    onEvent: (event, id) => {
      const data = event.data ?? {};
      const summary = data.reason ?? data.message ?? data.status ?? data.phase ?? "";
      body.prepend(
        h(
          "tr",
          { dataset: { id: id ?? "" } },
          h("td", {}, time(event.time)),
          h("td", {}, h("code", {}, event.type)),
          h("td", {}, data.name ?? event.subject ?? ""),
          h("td", {}, typeof summary === "string" ? summary : JSON.stringify(summary)),
        ),
      );
      while (body.childElementCount > 500) body.lastElementChild.remove();
    },
    onState: (s) => {
      state.textContent = s;
      state.className = `badge ${s === "live" ? "ok" : "wait"}`;
    },
  });
  onAbort(signal, stop);
}
