// Bundles the console (src/) into the gateway's static directory, which is not committed:
// `make console` (a prerequisite of `make run` and `make test`) runs this after `npm ci`.
import { build } from "esbuild";
import { copyFile, mkdir, readFile, readdir, rm, writeFile } from "node:fs/promises";
import { gzipSync } from "node:zlib";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = process.argv[2] ?? join(here, "..", "services", "gateway", "src", "lambdabus_gateway", "ui");

await rm(out, { recursive: true, force: true });
await mkdir(out, { recursive: true });
await build({
  entryPoints: { app: join(here, "src", "app.js"), style: join(here, "src", "style.css") },
  bundle: true,
  minify: true,
  sourcemap: false,
  format: "esm",
  splitting: true,
  chunkNames: "chunk-[hash]",
  target: ["chrome110", "firefox115", "safari16"],
  outdir: out,
  legalComments: "linked",
  logLevel: "warning",
});
await copyFile(join(here, "src", "index.html"), join(out, "index.html"));
await copyFile(join(here, "src", "icon.svg"), join(out, "icon.svg"));
// Served pre-compressed where the browser takes gzip (aiohttp's FileResponse picks the .gz).
for (const name of await readdir(out)) {
  if (!/\.(js|css)$/.test(name)) continue;
  const path = join(out, name);
  await writeFile(`${path}.gz`, gzipSync(await readFile(path), { level: 9 }));
}
console.log(`console built into ${out}`);
