/**
 * Machine benchmarks (issue 2): instrumented vs original guest CPU speed, state save and
 * restore time per GiB, and redis-benchmark against kv.wasm compared with kv built natively.
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { loadGuest } from '../src/machine/instrument.js';
import { Machine } from '../src/machine/machine.js';
import { WasiHost, type VcpuHooks } from '../src/machine/wasi-host.js';
import { Nic } from '../src/net/nic.js';
import { Clock } from '../src/machine/devices/clock.js';
import { Serial } from '../src/machine/devices/serial.js';
import { ProcExit } from '../src/machine/wasi-abi.js';
import { loadMachineFromFile, saveMachineToFile } from '../src/migration/file.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const cpuGuest = path.join(root, 'bench/guests/cpu.wasm');
const memwalkGuest = path.join(root, 'test/guests/memwalk.wasm');
const kvGuest = path.join(root, 'examples/kv/kv.wasm');
const coloBin = path.join(root, 'dist/src/cli/main.js');

function table(rows: (string | number)[][]): void {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => String(r[i]).length)));
  for (const [n, r] of rows.entries()) {
    process.stdout.write('| ' + r.map((c, i) => String(c).padEnd(widths[i]!)).join(' | ') + ' |\n');
    if (n === 0) process.stdout.write('|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|\n');
  }
}

/** The original module, run once to completion with our WASI host and no instrumentation. */
function runOriginal(bytes: Uint8Array, args: string[]): { ms: number; out: string } {
  let out = '';
  const hooks: VcpuHooks = {
    finishRewind: () => false,
    pauseRequested: () => false,
    startUnwind() {
      throw new Error('the original module cannot unwind');
    },
    drainInput() {},
    waitForInput: () => false,
    waitForDiskSpace: () => false,
    diskWriteDone() {},
    output() {},
    markWrite() {},
  };
  const serialFd = fs.openSync(path.join(os.tmpdir(), `colo-bench-serial-${process.pid}`), 'w');
  let host: WasiHost | null = null;
  const imports = new Proxy({}, {
    get: (_t, name: string) => (...a: never[]) => (host!.imports()[name] as (...x: never[]) => number)(...a),
  });
  const module = new WebAssembly.Module(bytes);
  const instance = new WebAssembly.Instance(module, { wasi_snapshot_preview1: imports as WebAssembly.ModuleImports });
  const clock = new Clock();
  clock.resume();
  host = new WasiHost(instance.exports.memory as WebAssembly.Memory, hooks, { clock, serial: new Serial(serialFd), nic: new Nic(), disk: null }, ['cpu', ...args], []);
  const t0 = performance.now();
  try {
    (instance.exports._start as () => void)();
  } catch (err) {
    if (!(err instanceof ProcExit) || err.code !== 0) throw err;
  }
  const ms = performance.now() - t0;
  fs.closeSync(serialFd);
  out = fs.readFileSync(path.join(os.tmpdir(), `colo-bench-serial-${process.pid}`), 'utf8');
  fs.rmSync(path.join(os.tmpdir(), `colo-bench-serial-${process.pid}`), { force: true });
  return { ms, out };
}

async function runInstrumented(args: string[]): Promise<{ ms: number; out: string }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-bench-'));
  const serial = path.join(dir, 'serial');
  const m = await Machine.create({ guest: await loadGuest(cpuGuest), memoryBytesMax: 256 * 1024 * 1024, args: ['cpu', ...args], env: [], serial: { kind: 'file', path: serial }, drive: null });
  try {
    const done = new Promise<void>((resolve, reject) => {
      m.once('shutdown', () => resolve());
      m.once('panicked', (msg: string) => reject(new Error(msg)));
    });
    const t0 = performance.now();
    await m.cont();
    await done;
    return { ms: performance.now() - t0, out: fs.readFileSync(serial, 'utf8') };
  } finally {
    await m.destroy();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function cpuSpeed(): Promise<void> {
  const bytes = fs.readFileSync(cpuGuest);
  const args = ['2'];
  const raw: number[] = [];
  const inst: number[] = [];
  let checksum = '';
  for (let i = 0; i < 3; i++) {
    const r = runOriginal(bytes, args);
    raw.push(r.ms);
    const s = await runInstrumented(args);
    inst.push(s.ms);
    if (r.out.trim() !== s.out.trim()) throw new Error(`instrumented output differs: ${r.out} vs ${s.out}`);
    checksum = r.out.trim();
  }
  const best = (x: number[]) => Math.min(...x);
  process.stdout.write(`CPU-bound guest (bench/guests/cpu.wasm, 2 rounds; ${checksum}), best of 3:\n\n`);
  table([
    ['run', 'time ms', 'ratio to original'],
    ['original module', best(raw).toFixed(0), '1.00'],
    ['instrumented, in the vCPU worker', best(inst).toFixed(0), (best(inst) / best(raw)).toFixed(2)],
  ]);
}

async function saveRestore(): Promise<void> {
  const regionBytes = 1024 * 1024 * 1024;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-bench-'));
  const serial = path.join(dir, 'serial');
  const stateFile = path.join(dir, 'state');
  const guest = await loadGuest(memwalkGuest);
  const cfg = { guest, memoryBytesMax: regionBytes + 64 * 1024 * 1024, args: ['memwalk', '1024M'], env: [], serial: { kind: 'file' as const, path: serial }, drive: null };
  const a = await Machine.create(cfg);
  try {
    await a.cont();
    const deadline = Date.now() + 60000;
    while (!fs.readFileSync(serial, 'latin1').includes('B')) {
      if (Date.now() > deadline) throw new Error('memwalk did not complete a pass over 1 GiB in 60 s');
      await new Promise((r) => setTimeout(r, 50));
    }
    await a.pause();
    const ramBytes = a.ram().byteLength;
    const t0 = performance.now();
    const vcpu = await a.saveVcpu();
    const stats = saveMachineToFile(a, vcpu, stateFile);
    const saveMs = performance.now() - t0;
    await a.destroy();
    const b = await Machine.create({ ...cfg, serial: { kind: 'none' } });
    const t1 = performance.now();
    await loadMachineFromFile(b, stateFile);
    const restoreMs = performance.now() - t1;
    await b.destroy();
    const gib = ramBytes / 2 ** 30;
    process.stdout.write(`\nState file save/restore, memwalk with a 1 GiB region (RAM ${(ramBytes / 2 ** 20).toFixed(0)} MiB, ${stats.normalPages} non-zero pages, file ${(stats.bytes / 2 ** 20).toFixed(0)} MiB on ${dir}):\n\n`);
    table([
      ['operation', 'ms', 'ms per GiB of RAM', 'GB/s'],
      ['save (pause → file synced)', saveMs.toFixed(0), (saveMs / gib).toFixed(0), (ramBytes / 1e9 / (saveMs / 1000)).toFixed(2)],
      ['restore (file → machine ready)', restoreMs.toFixed(0), (restoreMs / gib).toFixed(0), (ramBytes / 1e9 / (restoreMs / 1000)).toFixed(2)],
    ]);
  } finally {
    await a.destroy();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
}

async function waitPing(port: number): Promise<void> {
  const deadline = Date.now() + 30000;
  while (Date.now() < deadline) {
    const r = spawnSync('redis-cli', ['-p', String(port), 'ping'], { encoding: 'utf8' });
    if (r.stdout.trim() === 'PONG') return;
    await new Promise((res) => setTimeout(res, 100));
  }
  throw new Error(`no PONG on port ${port} within 30 s`);
}

function benchOps(port: number): Map<string, number> {
  const r = spawnSync('redis-benchmark', ['-p', String(port), '-q', '-n', '50000', '-c', '50', '-t', 'ping,set,get,incr,lpush'], { encoding: 'utf8', timeout: 300000 });
  const out = new Map<string, number>();
  for (const line of r.stdout.split(/[\r\n]+/)) {
    const m = /^([A-Z_]+): ([\d.]+) requests per second/.exec(line.trim());
    if (m !== null) out.set(m[1]!, Number(m[2]));
  }
  return out;
}

async function kvOps(): Promise<void> {
  if (spawnSync('redis-benchmark', ['--version']).status !== 0) {
    process.stdout.write('\nredis-benchmark is not installed (apt-get install redis-tools): kv benchmark not run\n');
    return;
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-bench-kv-'));
  const procs: ReturnType<typeof spawn>[] = [];
  try {
    const disk = path.join(dir, 'kv.img');
    fs.writeFileSync(disk, Buffer.alloc(64 * 1024 * 1024));
    const port = await freePort();
    const vm = spawn(process.execPath, [coloBin, 'run', kvGuest, '--memory', '256M', '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${disk}`, '--serial', 'none'], { stdio: 'ignore' });
    procs.push(vm);
    await waitPing(port);
    const wasm = benchOps(port);
    let native: Map<string, number> | null = null;
    const nativeBin = path.join(dir, 'kv-native');
    const cc = spawnSync('cc', ['-O2', '-o', nativeBin, ...fs.readdirSync(path.join(root, 'examples/kv')).filter((f) => f.endsWith('.c')).map((f) => path.join(root, 'examples/kv', f)), '-lm']);
    if (cc.status === 0) {
      const nport = await freePort();
      const ndisk = path.join(dir, 'kv-native.img');
      fs.writeFileSync(ndisk, Buffer.alloc(64 * 1024 * 1024));
      const n = spawn(nativeBin, ['-p', String(nport), '-d', ndisk], { stdio: 'ignore' });
      procs.push(n);
      await waitPing(nport);
      native = benchOps(nport);
    }
    process.stdout.write('\nredis-benchmark -n 50000 -c 50 against kv.wasm under `colo run` (64 MiB disk) and against the same kv sources built natively:\n\n');
    const rows: (string | number)[][] = [['test', 'kv.wasm ops/s', 'native ops/s', 'ratio']];
    for (const [k, v] of wasm) {
      const nv = native?.get(k);
      rows.push([k, v.toFixed(0), nv === undefined ? '-' : nv.toFixed(0), nv === undefined ? '-' : (v / nv).toFixed(2)]);
    }
    table(rows);
  } finally {
    for (const p of procs) p.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export async function run(): Promise<void> {
  await cpuSpeed();
  await saveRestore();
  await kvOps();
}
