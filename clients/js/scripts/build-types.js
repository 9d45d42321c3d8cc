#!/usr/bin/env node
// Writes the package's shipped type declarations into types/ (run by `npm pack`/`npm publish`
// through `prepack`): tsc emits a .d.ts for every module from its JSDoc, and the generated
// protocol.d.ts, which tsc does not copy, is copied beside them.
//
//   node scripts/build-types.js [outDir]     (default: types)

import { spawnSync } from "node:child_process";
import { copyFileSync, mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const PACKAGE = join(dirname(fileURLToPath(import.meta.url)), "..");
const outDir = resolve(PACKAGE, process.argv[2] ?? "types");
const tsc = join(PACKAGE, "node_modules", "typescript", "bin", "tsc");
const result = spawnSync(process.execPath, [tsc, "-p", join(PACKAGE, "tsconfig.build.json"), "--outDir", outDir],
                         { stdio: "inherit" });
if (result.status !== 0) process.exit(result.status ?? 1);
mkdirSync(outDir, { recursive: true });
copyFileSync(join(PACKAGE, "src", "protocol.d.ts"), join(outDir, "protocol.d.ts"));
console.log(`types written to ${outDir}`);
