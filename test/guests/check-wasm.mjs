#!/usr/bin/env node
// Checks that guest .wasm files fit the colo-vm host contract:
//   * a WASI command: exports `_start` and `memory`, no start section;
//   * imports only the wasi_snapshot_preview1 functions the host implements;
//   * (when the `binaryen` package is installed) validates with MVP features
//     only, i.e. no bulk-memory, SIMD, threads, reference types, ...
// Usage: node test/guests/check-wasm.mjs a.wasm [b.wasm ...]
// Prints one summary line per module; exits 1 on the first violation.
import { readFileSync, statSync } from 'node:fs';

const ALLOWED = new Set([
  'args_get', 'args_sizes_get', 'environ_get', 'environ_sizes_get',
  'clock_time_get', 'clock_res_get', 'random_get', 'fd_write', 'fd_read',
  'fd_pread', 'fd_pwrite', 'fd_sync', 'fd_filestat_get', 'fd_fdstat_get',
  'fd_fdstat_set_flags', 'fd_seek', 'fd_close', 'fd_prestat_get',
  'fd_prestat_dir_name', 'sock_accept', 'sock_recv', 'sock_send',
  'sock_shutdown', 'poll_oneoff', 'sched_yield', 'proc_exit',
]);

// Section ids present in the binary (walks the section headers only).
function sectionIds(buf) {
  const ids = [];
  let p = 8;
  const leb = () => {
    let r = 0, shift = 0, b;
    do { b = buf[p++]; r |= (b & 0x7f) << shift; shift += 7; } while (b & 0x80);
    return r >>> 0;
  };
  while (p < buf.length) {
    const id = buf[p++];
    const len = leb();
    ids.push(id);
    p += len;
  }
  return ids;
}

let binaryen = null;
try { binaryen = (await import('binaryen')).default; } catch { /* optional */ }

let failed = false;
for (const file of process.argv.slice(2)) {
  const problems = [];
  const buf = readFileSync(file);
  const mod = new WebAssembly.Module(buf);
  const imports = WebAssembly.Module.imports(mod);
  const exports = WebAssembly.Module.exports(mod);
  for (const i of imports) {
    if (i.module !== 'wasi_snapshot_preview1' || i.kind !== 'function' || !ALLOWED.has(i.name)) {
      problems.push(`forbidden import ${i.module}.${i.name} (${i.kind})`);
    }
  }
  if (!exports.some((e) => e.name === '_start' && e.kind === 'function')) problems.push('no _start export');
  if (!exports.some((e) => e.name === 'memory' && e.kind === 'memory')) problems.push('no memory export');
  if (sectionIds(buf).includes(8)) problems.push('has a start section');
  if (binaryen) {
    const m = binaryen.readBinary(buf);
    m.setFeatures(binaryen.Features.MVP);
    if (!m.validate()) problems.push('does not validate with MVP features only (bulk-memory/SIMD/...?)');
    m.dispose();
  }
  const names = imports.map((i) => i.name).sort().join(',');
  console.log(`${file}: ${statSync(file).size} bytes, imports [${names}]` +
    (binaryen ? ', MVP-valid' : ', feature check skipped (no binaryen)') +
    (problems.length ? `\n  FAIL: ${problems.join('\n  FAIL: ')}` : ''));
  if (problems.length) failed = true;
}
process.exit(failed ? 1 : 0);
