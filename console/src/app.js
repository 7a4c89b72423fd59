// The console: a hash router over views that talk only to the public API (see api.js).
import { ApiError, get, session, takeTokenFromFragment, tokenId } from "./api.js";
import { field, h, replace } from "./dom.js";
import { functionView } from "./function.js";
import { functionsView, newFunctionView } from "./functions.js";
import { secretsView, tokensView } from "./access.js";
import { deadLettersView, eventsView, schedulesView, triggersView } from "./resources.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const picker = document.getElementById("ns-picker");
const nsSelect = document.getElementById("ns");
const logout = document.getElementById("logout");
const who = h("span", { class: "muted", id: "who" });
logout.before(who);
let current = new AbortController();

function loginView(message) {
  for (const el of [nav, picker, logout, who]) el.hidden = true;
  const token = h("input", { type: "password", name: "token", required: true, autocomplete: "off", spellcheck: false });
  const error = h("p", { class: "error", role: "alert" }, message ?? "");
  replace(
    main,
    h(
      "form",
      {
        class: "stack card login",
        onsubmit: async (e) => {
          e.preventDefault();
          session.token = token.value.trim();
          known = { at: 0, names: [] };
          try {
            await get("/v1/namespaces");
            if (location.hash === "#/functions") await route();
            else location.hash = "#/functions"; // the hashchange routes
          } catch (err) {
            session.token = null;
            error.textContent = err.message;
          }
        },
      },
      h("h1", {}, "Sign in"),
      h("p", {}, "Paste a token (`make run` printed the admin token's path and a sign-in link). It stays in this tab only."),
      field("Token", token),
      error,
      h("div", {}, h("button", { type: "submit" }, "Sign in")),
    ),
  );
  token.focus();
}

// The namespace list, asked again at most every 30 s (not on every view).
let known = { at: 0, names: [] };

async function namespaces() {
  if (Date.now() - known.at > 30_000) {
    const { items } = await get("/v1/namespaces");
    known = { at: Date.now(), names: items.map((x) => x.name) };
  }
  const items = known.names.map((name) => ({ name }));
  const names = items.map((x) => x.name);
  if (!names.includes(session.namespace) && names.length) session.namespace = names[0];
  if (!names.includes(session.namespace)) names.push(session.namespace);
  replace(nsSelect, names.map((n) => h("option", { value: n, selected: n === session.namespace }, n)));
}

nsSelect.addEventListener("change", () => {
  session.namespace = nsSelect.value;
  route();
});
logout.addEventListener("click", () => {
  session.token = null;
  known = { at: 0, names: [] };
  location.hash = "#/login";
});
window.addEventListener("lambdabus:unauthenticated", () => {
  if (session.token) {
    session.token = null;
    loginView("The token was refused (expired or revoked): sign in again.");
  }
});

const ROUTES = [
  [/^#\/functions$/, () => functionsView],
  [/^#\/new$/, () => newFunctionView],
  [/^#\/fn\/([a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)(?:\/([a-z]+))?$/, (m) => (el, ctx) => functionView(el, { ...ctx, name: decodeURIComponent(m[1]), tab: m[2] })],
  [/^#\/triggers$/, () => triggersView],
  [/^#\/schedules$/, () => schedulesView],
  [/^#\/deadletters$/, () => deadLettersView],
  [/^#\/events$/, () => eventsView],
  [/^#\/secrets$/, () => (el, ctx) => secretsView(el, { ...ctx, namespace: session.namespace })],
  [/^#\/tokens$/, () => tokensView],
];

async function route() {
  current.abort();
  current = new AbortController();
  const { signal } = current;
  if (!session.token) return loginView();
  for (const el of [nav, picker, logout, who]) el.hidden = false;
  who.textContent = tokenId(session.token);
  const hash = location.hash || "#/functions";
  for (const a of nav.querySelectorAll("a")) a.setAttribute("aria-current", hash.startsWith(a.getAttribute("href")) ? "page" : "false");
  try {
    await namespaces();
    for (const [pattern, view] of ROUTES) {
      const m = pattern.exec(hash);
      if (m) {
        // Each view draws into a container of its own: one still loading when the user moves
        // on draws into a detached node, never over the next view.
        const container = h("div");
        replace(main, container);
        await view(m)(container, { signal });
        return;
      }
    }
    location.hash = "#/functions";
  } catch (err) {
    if (signal.aborted) return;
    if (err instanceof ApiError && err.status === 401) return loginView(err.message);
    replace(main, h("h1", {}, "Something went wrong"), h("p", { class: "error", role: "alert" }, `${err.code ?? "error"}: ${err.message}`));
  }
}

/** A sign-in link (`#token=`) is taken on load and on any later change of the fragment. */
async function onHash() {
  const problem = takeTokenFromFragment();
  if (problem && !session.token) return loginView(problem);
  await route();
  if (problem) main.prepend(h("p", { class: "error", role: "alert" }, problem));
}

window.addEventListener("hashchange", onHash);
onHash();
