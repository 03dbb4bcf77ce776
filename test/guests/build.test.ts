/**
 * The README's `npm run guests`: the guests' build scripts rebuild the committed .wasm files.
 * `npm run` puts node_modules/.bin on PATH, binaryen's `wasm-opt` among them, and clang runs
 * a `wasm-opt` it finds after every optimized link: the rebuilt guests then used sign-extension
 * instructions, which check-wasm.mjs refuses (MVP only), and the build failed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { TestEnv, repoRoot, runProgram } from '../framework/harness.js';

const sources = ['tools/wasi-cc.sh', 'test/guests/build.sh', 'test/guests/check-wasm.mjs', 'test/guests/memwalk/memwalk.c', 'test/guests/spin/spin.c', 'test/guests/fill/fill.c'];
const built = ['memwalk', 'spin', 'fill'];

test('the test guests rebuild byte for byte with node_modules/.bin (wasm-opt) on PATH, as under npm run', async (t) => {
  const probe = await runProgram('bash', ['-c', 'source tools/wasi-cc.sh'], { cwd: repoRoot, timeoutMs: 30000 }).catch(() => null);
  // .ci/run installs the toolchain: without it this fails rather than passing unchecked.
  assert.ok(probe !== null && probe.code === 0, `a WASI toolchain (Debian: clang lld wasi-libc libclang-rt-dev-wasm32): ${probe?.stderr.trim() ?? 'bash failed'}`);
  const bin = path.join(repoRoot, 'node_modules/.bin');
  assert.ok(fs.existsSync(path.join(bin, 'wasm-opt')), 'binaryen installs a wasm-opt in node_modules/.bin');
  // A copy of the sources, so the committed .wasm files stay as they are; node_modules for
  // check-wasm.mjs's MVP check.
  const env = new TestEnv(t);
  const tree = env.file('tree');
  for (const f of sources) {
    fs.mkdirSync(path.dirname(path.join(tree, f)), { recursive: true });
    fs.copyFileSync(path.join(repoRoot, f), path.join(tree, f));
  }
  fs.symlinkSync(path.join(repoRoot, 'node_modules'), path.join(tree, 'node_modules'));
  const r = await runProgram('bash', ['test/guests/build.sh'], { cwd: tree, env: { PATH: `${bin}:${process.env.PATH ?? ''}` }, timeoutMs: 120000 });
  assert.equal(r.code, 0, `build.sh failed: ${r.stdout.slice(-300)} ${r.stderr.slice(-300)}`);
  for (const g of built) {
    const rebuilt = fs.readFileSync(path.join(tree, `test/guests/${g}.wasm`));
    const committed = fs.readFileSync(path.join(repoRoot, `test/guests/${g}.wasm`));
    assert.ok(rebuilt.equals(committed), `${g}.wasm rebuilt as ${rebuilt.length} bytes, committed ${committed.length}`);
  }
});
