/**
 * Migration benchmarks (issue 3), every ratio against a baseline measured in the same run:
 *
 * 1. throughput of a 1 GiB guest whose pages are all non-zero, plain and multifd 1/2/4
 *    channels, ÷ raw loopback TCP with the same number of sockets (tcp-raw.ts);
 * 2. the effective rate (guest RAM ÷ migration time) of an all-zero 1 GiB guest;
 * 3. downtime of the memwalk guest at downtime-limit 300 ms over 20 runs;
 * 4. the two dirty trackers (shadow, store log) on the same workloads.
 *
 * Environment: COLO_BENCH_REPS (default 3) repetitions per throughput figure (the median is
 * shown), COLO_BENCH_DOWNTIME_RUNS (default 20), COLO_BENCH_PARTS (a comma list of
 * throughput, zero, downtime, trackers; default all).
 */
import path from 'node:path';
import fs from 'node:fs';
import { BenchVm, median, quantile, root, table, tempDir } from './lib.js';
import { rawTcpThroughput } from './tcp-raw.js';

const gib = 1 << 30;
const fillGuest = path.join(root, 'test/guests/fill.wasm');
const memwalkGuest = path.join(root, 'test/guests/memwalk.wasm');
const reps = Number(process.env.COLO_BENCH_REPS ?? 3);
const downtimeRuns = Number(process.env.COLO_BENCH_DOWNTIME_RUNS ?? 20);

type Tracker = 'shadow' | 'store';

interface Mode {
  name: string;
  channels: number;
}

const modes: Mode[] = [
  { name: 'plain', channels: 0 },
  { name: 'multifd 1', channels: 1 },
  { name: 'multifd 2', channels: 2 },
  { name: 'multifd 4', channels: 4 },
];

interface Run {
  totalMs: number;
  setupMs: number;
  downtimeMs: number;
  ramBytes: number;
  wireBytes: number;
}

function caps(channels: number): [Record<string, boolean>, Record<string, number>] {
  return [{ multifd: channels > 0 }, channels > 0 ? { 'multifd-channels': channels } : {}];
}

/** Migrate `src` into a new `--incoming defer` process; returns the stats and the new VM. */
async function migrateOnce(dir: string, src: BenchVm, guest: string, memory: string, guestArgs: string[], channels: number, tracker: Tracker, params: Record<string, number> = {}): Promise<{ run: Run; dst: BenchVm }> {
  const name = src.name === 'a' ? 'b' : 'a';
  const dst = await BenchVm.start(dir, name, guest, ['--memory', memory, '--dirty-log', tracker, '--incoming', 'defer'], guestArgs);
  const [c, p] = caps(channels);
  await src.setMigration(c, { ...p, ...params });
  await dst.setMigration(c, p);
  await dst.qmp.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
  const where = await dst.migrationInfo();
  const port = Number((where['socket-address'] as { port: string }[])[0]!.port);
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  const info = await src.waitStatus('completed');
  await dst.waitStatus('completed');
  const ram = info.ram as Record<string, number>;
  return {
    run: {
      totalMs: info['total-time'] as number,
      setupMs: info['setup-time'] as number,
      downtimeMs: info.downtime as number,
      ramBytes: ram.total!,
      wireBytes: ram.transferred!,
    },
    dst,
  };
}

/** Throughput of round after round of ping-pong migrations of one filled guest. */
async function dataGuest(dir: string, tracker: Tracker, which: Mode[], n: number): Promise<Map<string, Run[]>> {
  const out = new Map<string, Run[]>();
  const args = ['--memory', '1100M', '--dirty-log', tracker];
  let vm = await BenchVm.start(dir, 'a', fillGuest, args, ['1G', 'data']);
  try {
    await vm.waitSerial('fill ready');
    for (const m of which) {
      const runs: Run[] = [];
      for (let i = 0; i < n; i++) {
        const { run, dst } = await migrateOnce(dir, vm, fillGuest, '1100M', ['1G', 'data'], m.channels, tracker);
        await vm.stop();
        vm = dst;
        runs.push(run);
      }
      out.set(m.name, runs);
    }
  } finally {
    await vm.stop();
  }
  return out;
}

/** A freshly booted all-zero guest (`fill 1G untouched|zero`) migrated once per run. */
async function zeroGuest(dir: string, tracker: Tracker, fillMode: 'untouched' | 'zero', channels: number, n: number): Promise<Run[]> {
  const runs: Run[] = [];
  for (let i = 0; i < n; i++) {
    const src = await BenchVm.start(dir, 'a', fillGuest, ['--memory', '1100M', '--dirty-log', tracker], ['1G', fillMode]);
    try {
      // Capabilities first, as an operator would: the multifd threads start while the guest boots.
      const [c, p] = caps(channels);
      await src.setMigration(c, p);
      await src.waitSerial('fill ready');
      const { run, dst } = await migrateOnce(dir, src, fillGuest, '1100M', ['1G', fillMode], channels, tracker);
      await dst.stop();
      runs.push(run);
    } finally {
      await src.stop();
    }
  }
  return runs;
}

/** Downtime of memwalk (96 MiB written continuously, 1 GiB RAM allowed) at downtime-limit 300 ms. */
async function memwalkDowntime(dir: string, tracker: Tracker, channels: number, n: number): Promise<Run[]> {
  const runs: Run[] = [];
  const args = ['--memory', '1G', '--dirty-log', tracker];
  let vm = await BenchVm.start(dir, 'a', memwalkGuest, args, ['96M']);
  try {
    await vm.waitSerial('B');
    for (let i = 0; i < n; i++) {
      const { run, dst } = await migrateOnce(dir, vm, memwalkGuest, '1G', ['96M'], channels, tracker, { 'downtime-limit': 300 });
      await vm.stop();
      vm = dst;
      runs.push(run);
      // Let the guest run at full speed on its new host before the next migration.
      await new Promise((r) => setTimeout(r, 300));
    }
  } finally {
    await vm.stop();
  }
  return runs;
}

const gbps = (bytesPerMs: number): string => (bytesPerMs / 1e6).toFixed(2);
const transferMs = (r: Run): number => Math.max(1, r.totalMs - r.setupMs);

export async function run(): Promise<void> {
  if (!fs.existsSync(fillGuest)) throw new Error(`${fillGuest} is missing (bash test/guests/build.sh)`);
  const dir = tempDir();
  // COLO_BENCH_PARTS=throughput,zero,downtime,trackers runs a subset.
  const parts = (process.env.COLO_BENCH_PARTS ?? 'throughput,zero,downtime,trackers').split(',');
  try {
    if (parts.includes('throughput')) await throughputTables(dir);
    if (parts.includes('zero')) await zeroTables(dir);
    if (parts.includes('downtime')) await downtimeTables(dir);
    if (parts.includes('trackers')) await trackerTables(dir);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function throughputTables(dir: string): Promise<void> {
  process.stdout.write(`### 1 GiB guest, every page non-zero (median of ${reps})\n\n`);
  // Baselines: best of 5 (a run that lost the CPU to a neighbour says nothing about TCP), so
  // the ratios below err on the low side.
  const raw = new Map<number, number>();
  const rawFresh = new Map<number, number>();
  const rawTouched = new Map<number, number>();
  for (const n of [1, 2, 4]) {
    const xs: number[] = [];
    const fs: number[] = [];
    const ts: number[] = [];
    for (let i = 0; i < 5; i++) {
      xs.push(await rawTcpThroughput(n, gib, 'reuse'));
      fs.push(await rawTcpThroughput(n, gib, 'fresh'));
      ts.push(await rawTcpThroughput(n, gib, 'touched'));
    }
    raw.set(n, Math.max(...xs));
    rawFresh.set(n, Math.max(...fs));
    rawTouched.set(n, Math.max(...ts));
  }
  const data = await dataGuest(dir, 'store', modes, reps);
  const rows: (string | number)[][] = [['mode', 'sockets', 'total ms', 'setup ms', 'downtime ms', 'migration GB/s', 'raw TCP GB/s', 'ratio', 'raw TCP keeping bytes, fresh memory GB/s', 'ratio to that', 'raw TCP keeping bytes, touched memory GB/s']];
  for (const m of modes) {
    const runs = data.get(m.name)!;
    const sockets = Math.max(1, m.channels);
    const rate = median(runs.map((r) => r.ramBytes / transferMs(r)));
    const r = raw.get(sockets)!;
    const f = rawFresh.get(sockets)!;
    rows.push([m.name, sockets, Math.round(median(runs.map((x) => x.totalMs))), Math.round(median(runs.map((x) => x.setupMs))), Math.round(median(runs.map((x) => x.downtimeMs))), gbps(rate), gbps(r), (rate / r).toFixed(2), gbps(f), (rate / f).toFixed(2), gbps(rawTouched.get(sockets)!)]);
  }
  table(rows);
  process.stdout.write('migration GB/s = guest RAM ÷ (total-time − setup-time), median; raw TCP: 1 GiB over the same number of sockets, worker per socket, no processing, receivers discarding into one reused buffer, best of 5; keeping bytes: the receivers keep all 1 GiB, in memory never touched before (the kernel zeroes and maps a page per 4 KiB, as on every migration destination) or written once before the clock starts, best of 5.\n\n');
  const ceiling = [1, 2, 4].map((n) => `${n} socket${n > 1 ? 's' : ''}: ${(rawFresh.get(n)! / raw.get(n)!).toFixed(2)}`).join(', ');
  process.stdout.write(`Ceiling for any destination that keeps the bytes it receives in fresh memory, as a fraction of raw TCP (fresh ÷ raw): ${ceiling}.\n\n`);
  const touch = firstTouchMs();
  process.stdout.write(`For scale: writing one byte into each 4 KiB page of a fresh 1 GiB memory (the page faults every destination pays once) took ${touch.toFixed(0)} ms here (${(gib / touch / 1e6).toFixed(2)} GB/s).\n\n`);
}

/** ms to fault in a fresh 1 GiB WebAssembly memory, one write per page (what a destination pays). */
function firstTouchMs(): number {
  const mem = new WebAssembly.Memory({ initial: gib / 65536, maximum: gib / 65536, shared: true });
  const b = new Uint8Array(mem.buffer);
  const t = performance.now();
  for (let i = 0; i < b.byteLength; i += 4096) b[i] = 1;
  return performance.now() - t;
}

async function zeroTables(dir: string): Promise<void> {
  process.stdout.write(`### 1 GiB all-zero guest (median of ${reps}, multifd 2, store log)\n\n`);
  const rows: (string | number)[][] = [['guest RAM', 'total ms', 'setup ms', 'downtime ms', 'GB/s over total-time', 'GB/s over total − setup']];
  for (const fill of ['untouched', 'zero'] as const) {
    const runs = await zeroGuest(dir, 'store', fill, 2, reps);
    rows.push([
      fill === 'untouched' ? 'never written' : 'written with zeros',
      Math.round(median(runs.map((r) => r.totalMs))),
      Math.round(median(runs.map((r) => r.setupMs))),
      Math.round(median(runs.map((r) => r.downtimeMs))),
      gbps(median(runs.map((r) => r.ramBytes / r.totalMs))),
      gbps(median(runs.map((r) => r.ramBytes / transferMs(r)))),
    ]);
  }
  table(rows);
}

async function downtimeTables(dir: string): Promise<void> {
  process.stdout.write(`### memwalk downtime at downtime-limit 300 ms (${downtimeRuns} runs, multifd 2)\n\n`);
  const rows: (string | number)[][] = [['dirty log', 'median ms', 'p95 ms', 'max ms', 'within 300 ms', 'median total ms']];
  for (const tracker of ['shadow', 'store'] as const) {
    const runs = await memwalkDowntime(dir, tracker, 2, downtimeRuns);
    const d = runs.map((r) => r.downtimeMs);
    const within = d.filter((x) => x <= 300).length;
    rows.push([tracker, Math.round(median(d)), Math.round(quantile(d, 0.95)), Math.round(Math.max(...d)), `${within}/${runs.length} (${Math.round((within * 100) / runs.length)} %)`, Math.round(median(runs.map((r) => r.totalMs)))]);
  }
  table(rows);
}

async function trackerTables(dir: string): Promise<void> {
  process.stdout.write(`### shadow compare vs store log (median of ${reps})\n\n`);
  const rows: (string | number)[][] = [['workload', 'shadow', 'store log']];
  const two = [modes[2]!];
  const d: string[] = [];
  const z: string[] = [];
  for (const tracker of ['shadow', 'store'] as const) {
    const runs = (await dataGuest(dir, tracker, two, reps)).get('multifd 2')!;
    d.push(`${gbps(median(runs.map((r) => r.ramBytes / transferMs(r))))} GB/s`);
    const zr = await zeroGuest(dir, tracker, 'untouched', 2, reps);
    z.push(`${Math.round(median(zr.map((r) => r.totalMs)))} ms`);
  }
  rows.push(['1 GiB non-zero guest, multifd 2', d[0]!, d[1]!]);
  rows.push(['1 GiB never-written guest, total time', z[0]!, z[1]!]);
  rows.push(['memwalk passes/s (64 MiB region)', `${(await memwalkSpeed(dir, 'shadow')).toFixed(0)}`, `${(await memwalkSpeed(dir, 'store')).toFixed(0)}`]);
  table(rows);
  process.stdout.write('The memwalk downtime table above also compares the two.\n\n');
}

/** Guest speed under each tracker: memwalk passes per second over a 64 MiB region. */
async function memwalkSpeed(dir: string, tracker: Tracker): Promise<number> {
  const vm = await BenchVm.start(dir, 'a', memwalkGuest, ['--memory', '128M', '--dirty-log', tracker], ['64M']);
  try {
    await vm.waitSerial('B');
    await new Promise((r) => setTimeout(r, 500));
    const a = vm.serial().length;
    await new Promise((r) => setTimeout(r, 2000));
    return (vm.serial().length - a) / 2;
  } finally {
    await vm.stop();
  }
}
