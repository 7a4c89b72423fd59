// Secrets (values are written, never shown) and API tokens (a new token's secret is shown once).
import { call, get, nsPath } from "./api.js";
import { action, field, form, h, keyValues, replace, table, time, toast } from "./dom.js";

export async function secretsView(main, { namespace }) {
  const list = h("div");
  const render = async () => {
    const { items } = await get(nsPath(namespace, "/secrets"));
    replace(
      list,
      table(
        ["Name", "Keys", "Version", "Updated", ""],
        items.map((s) =>
          h(
            "tr",
            { dataset: { secret: s.name } },
            h("td", {}, s.name),
            h("td", {}, (s.keys ?? []).join(", ")),
            h("td", { class: "num" }, String(s.version ?? "")),
            h("td", {}, time(s.updated_at)),
            h(
              "td",
              {},
              action("Delete", {
                label: `Delete secret ${s.name}`,
                run: async () => {
                  await call("DELETE", nsPath(namespace, `/secrets/${encodeURIComponent(s.name)}`));
                  await render();
                },
                done: `secret ${s.name} deleted`,
              }),
            ),
          ),
        ),
        "Values are never shown: a function reads them under /secrets/<name>/<key>",
      ),
    );
  };
  const name = h("input", { name: "secret-name", required: true, autocomplete: "off" });
  const data = h("textarea", { name: "secret-data", rows: 4, spellcheck: false, autocomplete: "off" });
  const create = form({
    title: "New or replaced secret",
    fields: [field("Name", name), field("Keys and values (KEY=value a line)", data, "written, never read back")],
    label: "Save secret",
    submit: async () => {
      const body = { name: name.value.trim(), data: keyValues(data.value, "the secret") };
      const path = nsPath(namespace, `/secrets/${encodeURIComponent(body.name)}`);
      const exists = list.querySelector(`[data-secret="${CSS.escape(body.name)}"]`);
      if (exists) await call("PUT", path, { json: body });
      else await call("POST", nsPath(namespace, "/secrets"), { json: body });
      data.value = "";
      toast(`secret ${body.name} saved`);
      await render();
    },
  });
  replace(main, h("h1", {}, `Secrets in ${namespace}`), list, create);
  await render();
}

export async function tokensView(main) {
  const list = h("div");
  const shown = h("div", { "aria-live": "polite" });
  const render = async () => {
    const { items } = await get("/v1/tokens");
    replace(
      list,
      table(
        ["Id", "Name", "Role", "Namespaces", "Expires", "Created by", ""],
        items.map((t) =>
          h(
            "tr",
            { dataset: { token: t.id } },
            h("td", {}, h("code", {}, t.id)),
            h("td", {}, t.name),
            h("td", {}, t.role),
            h("td", {}, t.namespaces.join(", ")),
            h("td", {}, t.expired ? "expired" : t.expires ? time(t.expires) : "never"),
            h("td", {}, t.created_by ?? ""),
            h(
              "td",
              {},
              action("Revoke", {
                label: `Revoke token ${t.name}`,
                run: async () => {
                  await call("DELETE", `/v1/tokens/${encodeURIComponent(t.id)}`);
                  await render();
                },
                done: `token ${t.name} revoked`,
              }),
            ),
          ),
        ),
      ),
    );
  };
  const name = h("input", { name: "token-name", required: true, autocomplete: "off" });
  const role = h("select", { name: "token-role" }, ["developer", "viewer", "invoker", "auditor", "admin"].map((r) => h("option", { value: r }, r)));
  const namespaces = h("input", { name: "token-namespaces", required: true, value: "default" });
  const days = h("input", { type: "number", name: "token-days", min: 1, value: "30" });
  const mint = form({
    title: "Mint a token",
    fields: [field("Name", name), field("Role", role), field("Namespaces (comma-separated, * for every one)", namespaces), field("Expires in (days, empty: never)", days)],
    label: "Mint",
    submit: async () => {
      const request = {
        name: name.value.trim(),
        role: role.value,
        namespaces: namespaces.value.split(",").map((x) => x.trim()).filter(Boolean),
        expires_in: days.value ? Math.round(Number(days.value) * 86400) : null,
      };
      const minted = await call("POST", "/v1/tokens", { json: request });
      const secret = h("input", { readOnly: true, value: minted.token, class: "secret", "aria-label": "The new token" });
      replace(
        shown,
        h(
          "div",
          { class: "card stack" },
          h("strong", {}, `Token ${minted.name} (${minted.id}): copy it now, it is not shown again.`),
          secret,
          h("button", { type: "button", class: "quiet", onclick: () => navigator.clipboard?.writeText(minted.token).then(() => toast("copied")) }, "Copy"),
        ),
      );
      secret.select();
      await render();
    },
  });
  replace(main, h("h1", {}, "API tokens"), shown, list, mint);
  try {
    await render();
  } catch (err) {
    replace(list, h("p", { class: "error", role: "alert" }, err.status === 403 ? "Managing tokens needs an admin token for every namespace." : err.message));
  }
}
