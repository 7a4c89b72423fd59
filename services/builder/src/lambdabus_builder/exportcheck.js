'use strict';
// Run by the builder in the build sandbox (no network), with NODE_PATH at the function's
// node_modules: `node exportcheck.js CODE_DIR ENTRYPOINT FUNCTION`. Loads the entry point as the
// runtime will and prints one JSON line: {"ok": true}, or {"ok": false, "exports": [...]} when
// it has no function of that name (Kubeless's `--handler index.helloGet`), or
// {"ok": null, "error": "..."} when loading it failed (left for the instance to report).
const path = require('path');
const { pathToFileURL } = require('url');

async function main() {
  const [codeDir, entrypoint, handler] = process.argv.slice(2);
  const file = path.resolve(codeDir, entrypoint);
  let mod;
  try {
    try {
      mod = require(file);
    } catch (err) {
      if (!err || err.code !== 'ERR_REQUIRE_ESM') throw err;
      mod = await import(pathToFileURL(file).href);
    }
  } catch (err) {
    return { ok: null, error: String((err && err.message) || err).slice(0, 500) };
  }
  const found =
    (typeof mod === 'function' && handler === 'main') ||
    (mod && typeof mod[handler] === 'function') ||
    (mod && mod.default && typeof mod.default[handler] === 'function');
  if (found) return { ok: true };
  const names = mod && (typeof mod === 'object' || typeof mod === 'function') ? Object.keys(mod) : [];
  return { ok: false, exports: names.filter((k) => typeof mod[k] === 'function').sort() };
}

main().then((result) => {
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exit(0);
});
