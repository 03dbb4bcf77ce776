/**
 * COLO benchmarks (issue acceptance: checkpoint pause, throughput and latency under COLO,
 * failover time, peak RSS), every ratio against a baseline measured in the same run:
 *
 * 1. redis-benchmark (`-c 50 -t set,get,incr --csv`) against kv.wasm (256 MiB RAM, no disk)
 *    unprotected — the denominators — then under COLO (x-checkpoint-delay 100), plain and
 *    multifd 4: ops/s and p50/p99 latency ratios, the checkpoint pause (PVM stopped time)
 *    from the primary's `query-migrate` `x-colo` counters and, independently, from its
 *    STOP/RESUME event timestamps, and the peak RSS (VmHWM) of each node ÷ guest RAM;
 *    The lock-step floor, in the same rounds: one lone VM, then two, behind a native
 *    mirroring proxy (bench/lockstep-proxy.c) that sends a reply only when every VM produced
 *    it: what waiting for two copies costs on this machine with none of COLO's machinery;
 *    and the floor in one process (bench/lockstep-vm.ts): the lone VM's own front end feeding
 *    a second vCPU and waiting for both copies, no hop at all (floorTable);
 * 2. failover: SIGKILL the primary, `x-colo-lost-heartbeat` to the secondary at once, time to
 *    the first PING answered on the service address; COLO_BENCH_FAILOVERS (default 5) fresh pairs.
 *
 * Environment: COLO_BENCH_REDIS_N (requests per test, default 150000: ~250 checkpoints per COLO case, so the p99 pause is not just the worst one),
 * COLO_BENCH_WARMUP (requests per test run untimed before each load, default 20000: the JIT
 * has compiled the service's paths on both sides, and the first test is not its warm-up),
 * COLO_BENCH_FAILOVERS (default 5), COLO_BENCH_ROUNDS (default 2: rounds of unprotected, plain,
 * multifd 4 in turn; each setup's figures are its best round), COLO_BENCH_PARTS (load,failover; default both),
 * COLO_BENCH_PLACEMENTS (shared,two-host; default both: see Placement),
 * COLO_BENCH_FLOOR=0 (leave the lock-step floor out; it needs a C compiler, `cc`),
 * COLO_BENCH_SLOW_PERIOD=MS (add COLO plain at x-checkpoint-delay MS, to price the periodic
 * checkpoints),
 * COLO_BENCH_DEBUG=1 (keep the stderr of both nodes of each load case in
 * $TMPDIR/colo-bench-CHANNELS-{pvm,svm}.log; with COLO_LOG=debug it has a per-checkpoint
 * breakdown of the pause).
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { BenchVm, median, pinnedArgv, quantile, root, table, tempDir, waitFor } from './lib.js';
import type { QmpEvent } from '../src/control/qmp-client.js';

const kvGuest = path.join(root, 'examples/kv/kv.wasm');
const guestRam = 256 * 1024 * 1024;
const memory = '256M';
const checkpointDelayMs = 100;
const redisN = Number(process.env.COLO_BENCH_REDIS_N ?? 150000);
const warmupN = Number(process.env.COLO_BENCH_WARMUP ?? 20000);
const failovers = Number(process.env.COLO_BENCH_FAILOVERS ?? 5);
const rounds = Math.max(1, Number(process.env.COLO_BENCH_ROUNDS ?? 2));
const tests = ['SET', 'GET', 'INCR'];
/** COLO_BENCH_FLOOR=0 leaves out the lock-step floor's two setups (floorTable). */
const withFloor = process.env.COLO_BENCH_FLOOR !== '0';
/**
 * COLO_BENCH_SLOW_PERIOD=MS adds COLO plain at x-checkpoint-delay MS (2000: the period of
 * QEMU's docs/COLO-FT.txt; 3600000: checkpoints only on a mismatch or a timeout, none for kv),
 * to price the periodic checkpoints of the 100 ms setups against the rest of COLO.
 */
const onDemandDelayMs = Number(process.env.COLO_BENCH_SLOW_PERIOD ?? 0);
const onDemandOnly = onDemandDelayMs > 0;
/** A round in which the VM lost more than this share of its CPU to other VMs (steal) is noisy. */
const noisySteal = 0.02;

/**
 * Where the processes run. `shared`: anywhere on this machine's cores, so the secondary and
 * the client take CPU from the primary. `two-host`: how COLO is deployed (the secondary on a
 * host of its own), emulated on two cores: the primary (or the lone unprotected VM) and the
 * client share CPU 0, the secondary has CPU 1. The baseline gets the same CPU 0 and nothing
 * else, as if the second host sat idle.
 */
interface Placement {
  name: string;
  primary?: string;
  secondary?: string;
  client?: string;
}
const placementsKnown: Record<string, Placement> = {
  shared: { name: 'shared' },
  'two-host': { name: 'two-host', primary: '0', client: '0', secondary: '1' },
};

interface RedisRow {
  rps: number;
  p50: number;
  p99: number;
}

interface LoadResult {
  label: string;
  rows: Map<string, RedisRow>;
  wallMs: number;
  /** VmHWM in bytes: primary (or the lone VM), secondary. */
  hwm: [number, number | undefined];
  colo?: Record<string, unknown>;
  /** PVM STOP → RESUME from the primary's event timestamps, during the load. */
  eventPauses?: number[];
  /** CPU seconds (user + system) each node used during the load: primary (or the lone VM), secondary. */
  cpu: [number, number | undefined];
  /** Share of the VM's CPU time the hypervisor gave to others during the load (steal), and the share idle. */
  vmCpu: { steal: number; idle: number };
  /** The lock-step floor: releases whose lines differed between its two VMs (floorTable). */
  differingLines?: number;
}

/** The whole VM's CPU counters (/proc/stat line `cpu`, ticks): total, idle, steal. */
function vmTicks(): { total: number; idle: number; steal: number } {
  const line = fs.readFileSync('/proc/stat', 'latin1').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  return { total: line.reduce((a, b) => a + b, 0), idle: (line[3] ?? 0) + (line[4] ?? 0), steal: line[7] ?? 0 };
}

function vmShare(t0: { total: number; idle: number; steal: number }): { steal: number; idle: number } {
  const t1 = vmTicks();
  const d = Math.max(1, t1.total - t0.total);
  return { steal: (t1.steal - t0.steal) / d, idle: (t1.idle - t0.idle) / d };
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** VmHWM (peak resident set) of a process, bytes. */
/** utime + stime of a process in seconds (/proc/PID/stat, clock ticks of 10 ms). */
function cpuSeconds(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / 100;
  } catch {
    return undefined;
  }
}

function vmHwm(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const m = /^VmHWM:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'latin1'));
    return m === null ? undefined : Number(m[1]) * 1024;
  } catch {
    return undefined;
  }
}

/** redis-benchmark 7.0 `--csv`: "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms". */
async function redisBenchmark(port: number, n: number, cpus: string | undefined): Promise<{ rows: Map<string, RedisRow>; wallMs: number }> {
  const args = ['-h', '127.0.0.1', '-p', String(port), '-n', String(n), '-c', '50', '-t', tests.map((t) => t.toLowerCase()).join(','), '--csv'];
  const [cmd, ...argv] = pinnedArgv(['redis-benchmark', ...args], cpus);
  const started = performance.now();
  const child = spawn(cmd!, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  // A pair that stops serving would hang redis-benchmark: give up after 2 minutes.
  const timer = setTimeout(() => child.kill('SIGKILL'), 120000);
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  clearTimeout(timer);
  const wallMs = performance.now() - started;
  if (code !== 0) throw new Error(`redis-benchmark exited with ${code}: ${err}${out}`);
  const rows = new Map<string, RedisRow>();
  const lines = out.split('\n').map((l) => l.trim()).filter((l) => l.startsWith('"'));
  const header = lines[0]?.split(',').map((c) => c.replace(/"/g, '')) ?? [];
  const col = (name: string): number => {
    const i = header.indexOf(name);
    if (i < 0) throw new Error(`redis-benchmark --csv has no column ${name}: ${out}`);
    return i;
  };
  const [ci, cr, c50, c99] = [col('test'), col('rps'), col('p50_latency_ms'), col('p99_latency_ms')];
  for (const line of lines.slice(1)) {
    const c = line.split(',').map((x) => x.replace(/"/g, ''));
    rows.set(c[ci]!, { rps: Number(c[cr]), p50: Number(c[c50]), p99: Number(c[c99]) });
  }
  for (const t of tests) if (!rows.has(t)) throw new Error(`redis-benchmark printed no ${t} row: ${out}${err}`);
  return { rows, wallMs };
}

interface Pair {
  pvm: BenchVm;
  svm: BenchVm;
  port: number;
}

/** Primary and secondary kv.wasm on the same service address, in COLO state. */
async function startPair(dir: string, channels: number, port: number, where: Placement = placementsKnown.shared!, delayMs = checkpointDelayMs): Promise<Pair> {
  const common = ['--memory', memory, '--net', `listen=127.0.0.1:${port}`];
  const started = await Promise.allSettled([
    BenchVm.start(dir, 'pvm', kvGuest, common, [], where.primary),
    BenchVm.start(dir, 'svm', kvGuest, [...common, '--incoming', 'defer'], [], where.secondary),
  ]);
  const vms = started.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
  try {
    for (const r of started) if (r.status === 'rejected') throw r.reason;
    const [pvm, svm] = vms as [BenchVm, BenchVm];
    const caps: Record<string, boolean> = channels > 0 ? { 'x-colo': true, multifd: true } : { 'x-colo': true };
    const params: Record<string, number> = channels > 0 ? { 'multifd-channels': channels } : {};
    await Promise.all([pvm.setMigration(caps, { ...params, 'x-checkpoint-delay': delayMs }), svm.setMigration(caps, params)]);
    await pvm.waitSerial('kv ready');
    await svm.qmp.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
    const where = await svm.migrationInfo();
    const migPort = Number((where['socket-address'] as { port: string }[])[0]!.port);
    await pvm.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
    await pvm.waitStatus('colo', 60000);
    await svm.waitStatus('colo', 60000);
    return { pvm, svm, port };
  } catch (err) {
    await stopAll(vms);
    throw err;
  }
}

async function stopAll(vms: (BenchVm | undefined)[]): Promise<void> {
  await Promise.all(vms.map((v) => v?.stop().catch(() => v.child.kill('SIGKILL'))));
}

/** STOP → RESUME intervals (ms) of the events with index ≥ from. */
function pausesFromEvents(events: readonly QmpEvent[], from: number): number[] {
  const ts = (e: QmpEvent): number => e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000;
  const out: number[] = [];
  let stopAt: number | undefined;
  for (const e of events) {
    if (e.index < from) continue;
    if (e.event === 'STOP') stopAt = ts(e);
    else if (e.event === 'RESUME' && stopAt !== undefined) {
      out.push(ts(e) - stopAt);
      stopAt = undefined;
    }
  }
  return out;
}

/** The load against one process serving on `port` (a lone VM, or the floor in one process); it is stopped after. */
async function loneLoad(vm: BenchVm, port: number, where: Placement, label: string): Promise<LoadResult> {
  try {
    await vm.waitSerial('kv ready');
    if (warmupN > 0) await redisBenchmark(port, warmupN, where.client);
    const c0 = cpuSeconds(vm.child.pid)!;
    const v0 = vmTicks();
    const r = await redisBenchmark(port, redisN, where.client);
    const cpu = cpuSeconds(vm.child.pid)! - c0;
    const vmCpu = vmShare(v0);
    const hwm = vmHwm(vm.child.pid)!;
    return { label, ...r, hwm: [hwm, undefined], cpu: [cpu, undefined], vmCpu };
  } finally {
    await vm.stop();
  }
}

async function unprotected(dir: string, where: Placement): Promise<LoadResult> {
  const port = await freePort();
  const vm = await BenchVm.start(dir, 'solo', kvGuest, ['--memory', memory, '--net', `listen=127.0.0.1:${port}`], [], where.primary);
  return loneLoad(vm, port, where, 'unprotected');
}

let proxyBin: string | undefined;

/** bench/lockstep-proxy.c, built once per run with the host's C compiler. */
function buildProxy(dir: string): string {
  if (proxyBin !== undefined && proxyBin.startsWith(dir)) return proxyBin;
  const out = path.join(dir, 'lockstep-proxy');
  const cc = spawnSync('cc', ['-O2', '-Wall', '-o', out, path.join(root, 'bench/lockstep-proxy.c')], { encoding: 'utf8' });
  if (cc.status !== 0) throw new Error(`cc could not build bench/lockstep-proxy.c (COLO_BENCH_FLOOR=0 leaves the floor out): ${cc.error?.message ?? ''}${cc.stderr}`);
  proxyBin = out;
  return out;
}

/** The lock-step floor's proxy (bench/lockstep-proxy.c) in a process of its own. */
async function startProxy(dir: string, backendPorts: number[], cpus: string | undefined): Promise<{ port: number; stop(): Promise<Record<string, number>> }> {
  const [cmd, ...argv] = pinnedArgv([buildProxy(dir), '0', ...backendPorts.map(String)], cpus);
  const child = spawn(cmd!, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  let exited = false;
  child.once('exit', () => (exited = true));
  try {
    const port = await waitFor('the lock-step proxy to listen', () => {
      if (exited) throw new Error(`the lock-step proxy exited: ${err}`);
      const m = /^ready (\d+)$/m.exec(out);
      return m === null ? undefined : Number(m[1]);
    }, 10000, 10);
    return {
      port,
      async stop() {
        child.kill('SIGTERM');
        await waitFor('the lock-step proxy to exit', () => exited, 5000).catch(() => child.kill('SIGKILL'));
        const line = out.trim().split('\n').pop() ?? '';
        return line.startsWith('{') ? (JSON.parse(line) as Record<string, number>) : {};
      },
    };
  } catch (e) {
    child.kill('SIGKILL');
    throw e;
  }
}

/**
 * The lock-step floor: one or two lone, unprotected VMs behind the mirroring proxy (native). With two,
 * every reply waits for both VMs' copies, which any lock-stepping system must do; with one,
 * the same proxy's hop without the second VM. Their ratio bounds what lock-step alone costs on
 * this machine, whatever the implementation (see docs/benchmarks.md, session 30).
 */
async function lockstepFloor(dir: string, copies: 1 | 2, where: Placement): Promise<LoadResult> {
  const ports = copies === 1 ? [await freePort()] : [await freePort(), await freePort()];
  const cpus = [where.primary, where.secondary];
  const started = await Promise.allSettled(ports.map((p, i) => BenchVm.start(dir, `floor${i}`, kvGuest, ['--memory', memory, '--net', `listen=127.0.0.1:${p}`], [], cpus[i])));
  const vms = started.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
  let proxy: Awaited<ReturnType<typeof startProxy>> | undefined;
  try {
    for (const r of started) if (r.status === 'rejected') throw r.reason;
    for (const vm of vms) await vm.waitSerial('kv ready');
    proxy = await startProxy(dir, ports, where.primary);
    if (warmupN > 0) await redisBenchmark(proxy.port, warmupN, where.client);
    const c0 = vms.map((vm) => cpuSeconds(vm.child.pid)!);
    const v0 = vmTicks();
    const r = await redisBenchmark(proxy.port, redisN, where.client);
    const cpu = vms.map((vm, i) => cpuSeconds(vm.child.pid)! - c0[i]!);
    const vmCpu = vmShare(v0);
    const counters = await proxy.stop();
    proxy = undefined;
    if ((counters.releasedBytes ?? 0) === 0) throw new Error(`the lock-step proxy released no reply bytes: ${JSON.stringify(counters)}`);
    const hwm: [number, number | undefined] = [vmHwm(vms[0]!.child.pid)!, vms[1] === undefined ? undefined : vmHwm(vms[1].child.pid)];
    return { label: copies === 1 ? 'one lone VM behind the proxy' : 'lock-step floor (two lone VMs)', ...r, hwm, cpu: [cpu[0]!, cpu[1]], vmCpu, differingLines: counters.mismatches };
  } finally {
    await proxy?.stop();
    await stopAll(vms);
  }
}

/**
 * The lock-step floor in one process (bench/lockstep-vm.ts): the lone VM's own front end feeds
 * a second vCPU the same input and writes a reply byte only once both copies produced it. No
 * hop, no mirror socket, no checkpoint: what is left of lock-step when every part of COLO that
 * an implementation could make cheaper is gone. In two-host the second vCPU's thread has the
 * secondary's CPU, the rest of the process the primary's.
 */
async function inProcessFloor(dir: string, where: Placement): Promise<LoadResult> {
  const port = await freePort();
  const vm = await BenchVm.start(dir, 'floor-inproc', kvGuest, ['--memory', memory, '--net', `listen=127.0.0.1:${port}`], [], where.primary, {
    bin: path.join(root, 'dist/bench/lockstep-vm.js'),
    env: { SECOND_VCPU_CPUS: where.secondary ?? '' },
  });
  const r = await loneLoad(vm, port, where, 'lock-step floor in one process');
  // Said by the process at its quit (loneLoad stops it).
  const differed = /(\d+) released chunks differed/.exec(vm.stderr);
  return { ...r, differingLines: differed === null ? undefined : Number(differed[1]) };
}

/**
 * COLO under the load. `delayMs` other than checkpointDelayMs (COLO_BENCH_SLOW_PERIOD): the pair
 * with fewer periodic checkpoints, which prices them against the rest of COLO.
 */
async function protectedLoad(dir: string, channels: number, where: Placement, delayMs = checkpointDelayMs): Promise<LoadResult> {
  const port = await freePort();
  const { pvm, svm } = await startPair(dir, channels, port, where, delayMs);
  try {
    await pvm.waitSerial('kv ready');
    if (warmupN > 0) await redisBenchmark(port, warmupN, where.client);
    const mark = pvm.qmp.eventCount;
    const c0 = [cpuSeconds(pvm.child.pid)!, cpuSeconds(svm.child.pid)!];
    const v0 = vmTicks();
    const r = await redisBenchmark(port, redisN, where.client);
    const cpu: [number, number] = [cpuSeconds(pvm.child.pid)! - c0[0]!, cpuSeconds(svm.child.pid)! - c0[1]!];
    const vmCpu = vmShare(v0);
    const info = await pvm.migrationInfo();
    const colo = info['x-colo'] as Record<string, unknown> | undefined;
    if (info.status !== 'colo') throw new Error(`the primary left COLO during the load: ${JSON.stringify(info)}`);
    const hwm: [number, number | undefined] = [vmHwm(pvm.child.pid)!, vmHwm(svm.child.pid)];
    if (process.env.COLO_BENCH_DEBUG) {
      fs.writeFileSync(path.join(os.tmpdir(), `colo-bench-${channels}-pvm.log`), pvm.stderr);
      fs.writeFileSync(path.join(os.tmpdir(), `colo-bench-${channels}-svm.log`), svm.stderr);
    }
    const eventPauses = pausesFromEvents(pvm.qmp.events, mark);
    // A pair that stays in COLO but stops checkpointing would look cheap: at least half the
    // checkpoints the timer asks for must have paused the PVM during the load.
    const expected = r.wallMs / delayMs;
    if (delayMs === checkpointDelayMs && eventPauses.length < expected / 2) {
      throw new Error(`only ${eventPauses.length} checkpoint pauses during ${(r.wallMs / 1000).toFixed(1)} s of load at x-checkpoint-delay ${checkpointDelayMs} (about ${Math.round(expected)} expected): checkpoints stalled`);
    }
    const label = channels > 0 ? `COLO multifd ${channels}` : 'COLO plain';
    return { label: delayMs === checkpointDelayMs ? label : `${label} at x-checkpoint-delay ${delayMs}`, ...r, hwm, colo, eventPauses, cpu, vmCpu };
  } finally {
    await stopAll([pvm, svm]);
  }
}

/** One PING on a new connection; true when +PONG came back. */
function pingOnce(port: number, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    let buf = '';
    const done = (ok: boolean): void => {
      clearTimeout(timer);
      s.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    s.setNoDelay(true);
    s.once('connect', () => s.write('PING\r\n'));
    s.on('data', (d: Buffer) => {
      buf += d.toString('latin1');
      if (buf.includes('+PONG')) done(true);
    });
    s.once('error', () => done(false));
    s.once('close', () => done(false));
  });
}

interface Failover {
  /** SIGKILL → first PONG. */
  totalMs: number;
  /** SIGKILL → x-colo-lost-heartbeat answered. */
  heartbeatMs: number;
  /** SIGKILL → the secondary's COLO_EXIT event received. */
  exitMs: number;
  /** SIGKILL → the primary's exit seen by this process (its sockets are closed by then). */
  deadMs: number;
  checkpointsBefore: number;
}

async function failoverOnce(dir: string, channels: number): Promise<Failover | null> {
  const port = await freePort();
  const { pvm, svm } = await startPair(dir, channels, port);
  try {
    // Some state: a short write burst, then two more checkpoints so it is on the secondary.
    await redisBenchmark(port, 2000, undefined);
    const checkpoints = async (): Promise<number> => Number(((await pvm.migrationInfo())['x-colo'] as Record<string, unknown> | undefined)?.checkpoints ?? NaN);
    const c0 = await checkpoints();
    try {
      await waitFor('two more checkpoints', async () => (await checkpoints()) >= c0 + 2, 20000, 10);
    } catch (err) {
      // Checkpoints stopped: a finding, not a reason to drop the other runs.
      const file = path.join(os.tmpdir(), `colo-bench-stall-${process.pid}-${Date.now()}.log`);
      const info = await pvm.migrationInfo().catch((e: unknown) => ({ error: String(e) }));
      const sinfo = await svm.migrationInfo().catch((e: unknown) => ({ error: String(e) }));
      fs.writeFileSync(file, `${(err as Error).message} (from checkpoint ${c0})\nprimary query-migrate: ${JSON.stringify(info)}\nsecondary query-migrate: ${JSON.stringify(sinfo)}\n===== primary stderr\n${pvm.stderr}\n===== secondary stderr\n${svm.stderr}`);
      process.stdout.write(`(a ${channels > 0 ? `multifd ${channels}` : 'plain'} pair stopped checkpointing: no 2 checkpoints within 20 s after the write burst; primary at checkpoint ${String((info as Record<string, Record<string, unknown>>)['x-colo']?.checkpoints)}, status ${String((info as Record<string, unknown>).status)}; details in ${file})\n`);
      return null;
    }
    const mark = svm.qmp.eventCount;
    const t0 = performance.now();
    let deadMs = NaN;
    pvm.child.once('exit', () => (deadMs = performance.now() - t0));
    pvm.child.kill('SIGKILL');
    let heartbeatMs = NaN;
    let exitMs = NaN;
    const hb = svm.qmp.execute('x-colo-lost-heartbeat', {}, { oob: true }).then(() => (heartbeatMs = performance.now() - t0));
    const exit = svm.qmp.waitEvent('COLO_EXIT', { after: mark, timeoutMs: 20000 }).then(() => (exitMs = performance.now() - t0));
    await waitFor('the secondary answering PING on the service address', () => pingOnce(port, 500), 20000, 2);
    const totalMs = performance.now() - t0;
    await Promise.all([hb, exit]);
    await waitFor('the primary to be reaped', () => !Number.isNaN(deadMs), 5000);
    return { totalMs, heartbeatMs, exitMs, deadMs, checkpointsBefore: c0 };
  } finally {
    await stopAll([pvm, svm]);
  }
}

const mib = (b: number | undefined): string => (b === undefined ? 'n/a' : (b / 1048576).toFixed(0));
const f1 = (x: number): string => x.toFixed(1);
const f2 = (x: number): string => x.toFixed(2);

function mibField(colo: Record<string, unknown> | undefined, name: string): string {
  const v = colo?.[name];
  return typeof v === 'number' ? (v / 1048576).toFixed(2) : 'n/a';
}

function field(colo: Record<string, unknown> | undefined, name: string, digits = 1): string {
  const v = colo?.[name];
  return typeof v === 'number' ? v.toFixed(digits) : 'n/a';
}

export async function run(): Promise<void> {
  if (!fs.existsSync(kvGuest)) throw new Error(`${kvGuest} is missing (bash examples/kv/build.sh)`);
  const parts = (process.env.COLO_BENCH_PARTS ?? 'load,failover').split(',');
  const dir = tempDir();
  try {
    if (parts.includes('load')) {
      const names = (process.env.COLO_BENCH_PLACEMENTS ?? 'shared,two-host').split(',');
      for (const name of names) {
        const where = placementsKnown[name];
        if (where === undefined) throw new Error(`COLO_BENCH_PLACEMENTS: unknown placement '${name}' (known: ${Object.keys(placementsKnown).join(', ')})`);
        if (where.secondary !== undefined && os.availableParallelism() < 2) {
          process.stdout.write(`Placement ${name} needs 2 CPUs; this machine has ${os.availableParallelism()}: skipped.\n\n`);
          continue;
        }
        await loadTables(dir, where);
      }
    }
    if (parts.includes('failover')) await failoverTable(dir);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function loadTables(dir: string, where: Placement): Promise<void> {
  const pin = where.secondary === undefined
    ? 'all processes unpinned on the shared cores'
    : `primary (or the lone VM) and redis-benchmark on CPU ${where.primary}, secondary on CPU ${where.secondary}`;
  process.stdout.write(`### Placement ${where.name}: kv.wasm (${memory} RAM, no disk) under redis-benchmark -n ${redisN} -c 50 -t set,get,incr; COLO at x-checkpoint-delay ${checkpointDelayMs}; ${pin}\n\n`);
  // Rounds of the three setups in turn, so that a slow phase of this shared VM hits every
  // setup; the order is reversed every other round (unprotected, plain, multifd 4; then
  // multifd 4, plain, unprotected), so that a steady drift favours none. Each setup's figure
  // per test is its best round (the baseline gets the same treatment as COLO, so a
  // neighbour's burst flatters neither).
  const setups = [() => unprotected(dir, where), () => protectedLoad(dir, 0, where), () => protectedLoad(dir, 4, where)];
  if (withFloor) setups.push(() => lockstepFloor(dir, 1, where), () => lockstepFloor(dir, 2, where), () => inProcessFloor(dir, where));
  const onDemand = setups.length;
  if (onDemandOnly) setups.push(() => protectedLoad(dir, 0, where, onDemandDelayMs));
  const runs: LoadResult[][] = setups.map(() => []);
  for (let round = 1; round <= rounds; round++) {
    const forward = setups.map((_, i) => i);
    const order = round % 2 === 1 ? forward : forward.reverse();
    const r: LoadResult[] = [];
    for (const i of order) r[i] = await setups[i]!();
    r.forEach((x, i) => {
      x.label = `${x.label} (round ${round})`;
      runs[i]!.push(x);
    });
  }
  const best = (xs: LoadResult[], label: string): LoadResult => {
    const out: LoadResult = { ...xs[0]!, label, rows: new Map(), hwm: [Math.max(...xs.map((x) => x.hwm[0])), xs[0]!.hwm[1] === undefined ? undefined : Math.max(...xs.map((x) => x.hwm[1]!))] };
    for (const t of tests) out.rows.set(t, xs.map((x) => x.rows.get(t)!).reduce((p, q) => (q.rps > p.rps ? q : p)));
    return out;
  };
  const base = best(runs[0]!, `unprotected (best of ${rounds})`);
  const results = [base, best(runs[1]!, `COLO plain (best of ${rounds})`), best(runs[2]!, `COLO multifd 4 (best of ${rounds})`)];
  const all = runs.flat();
  process.stdout.write(`ops/s per round: ${all.map((r) => `${r.label}: ${tests.map((t) => `${t} ${Math.round(r.rows.get(t)!.rps)}`).join(' ')}`).join('; ')}\n\n`);

  const rows: (string | number)[][] = [['setup', 'test', 'ops/s', 'p50 ms', 'p99 ms', 'ops/s ratio', 'p50 ratio', 'p99 ratio']];
  for (const r of results) {
    for (const t of tests) {
      const x = r.rows.get(t)!;
      const b = base.rows.get(t)!;
      rows.push([r.label, t, Math.round(x.rps), f2(x.p50), f2(x.p99), f2(x.rps / b.rps), f2(x.p50 / b.p50), f2(x.p99 / b.p99)]);
    }
  }
  table(rows);
  process.stdout.write('Ratios = COLO ÷ unprotected, same run (goals: ops/s ≥ 0.7, latency ≤ 1.5).\n\n');
  if (withFloor) floorTable(base, best(runs[3]!, `one lone VM behind the proxy (best of ${rounds})`), best(runs[4]!, `lock-step floor (best of ${rounds})`), best(runs[5]!, `lock-step floor in one process (best of ${rounds})`), results.slice(1), runs);
  if (onDemandOnly) {
    const od = best(runs[onDemand]!, `COLO plain at x-checkpoint-delay ${onDemandDelayMs} (best of ${rounds})`);
    const orow: (string | number)[][] = [['setup', 'test', 'ops/s', 'p50 ms', 'p99 ms', 'ops/s ÷ unprotected', 'p50 ÷ unprotected', 'p99 ÷ unprotected', 'checkpoints in the whole session']];
    for (const t of tests) {
      const x = od.rows.get(t)!;
      const b = base.rows.get(t)!;
      orow.push([od.label, t, Math.round(x.rps), f2(x.p50), f2(x.p99), f2(x.rps / b.rps), f2(x.p50 / b.p50), f2(x.p99 / b.p99), runs[onDemand]!.map((r) => field(r.colo, 'checkpoints', 0)).join(' ')]);
    }
    table(orow);
    process.stdout.write(`COLO plain at x-checkpoint-delay ${onDemandDelayMs} (COLO_BENCH_SLOW_PERIOD): fewer periodic checkpoints (kv triggers no other kind). Against COLO plain at ${checkpointDelayMs}, it prices the periodic checkpoints; against the floor in one process, the second process and its sockets.\n\n`);
  }

  // Best against best flatters whichever side had the luckier round. Each COLO round against
  // the baseline run of the same round shares that moment of this VM; their median is steadier.
  // A round in which either side lost CPU to other VMs says more about the neighbours than
  // about COLO: it is marked, and the last columns leave it out.
  const rrows: (string | number)[][] = [['setup', 'test', 'ops/s ratio per round', 'median', 'p50 ratio per round', 'median', 'quiet rounds', 'ops/s median, quiet', 'p50 median, quiet']];
  for (const [k, label] of [[1, 'COLO plain'], [2, 'COLO multifd 4']] as const) {
    const noisy = runs[k]!.map((x, i) => x.vmCpu.steal > noisySteal || runs[0]![i]!.vmCpu.steal > noisySteal);
    const mark = (xs: number[]): string => xs.map((x, i) => `${f2(x)}${noisy[i] ? '*' : ''}`).join(' ');
    const quiet = (xs: number[]): number[] => xs.filter((_, i) => !noisy[i]);
    for (const t of tests) {
      const ops = runs[k]!.map((x, i) => x.rows.get(t)!.rps / runs[0]![i]!.rows.get(t)!.rps);
      const p50 = runs[k]!.map((x, i) => x.rows.get(t)!.p50 / runs[0]![i]!.rows.get(t)!.p50);
      const q = quiet(ops).length;
      rrows.push([label, t, mark(ops), f2(median(ops)), mark(p50), f2(median(p50)), `${q} of ${ops.length}`, q > 0 ? f2(median(quiet(ops))) : 'n/a', q > 0 ? f2(median(quiet(p50))) : 'n/a']);
    }
  }
  table(rrows);
  process.stdout.write(`Per round: COLO of round r ÷ unprotected of round r. *: a noisy round (steal above ${noisySteal * 100} % in it or in its baseline round).\n\n`);

  // Where the CPU goes: per request, per node (user + system time of the whole process).
  const requests = redisN * tests.length;
  const crow: (string | number)[][] = [['setup', 'wall s', 'primary CPU s', 'secondary CPU s', 'CPU µs per request (both nodes)', 'cores busy (both nodes)', 'VM idle %', 'VM steal %']];
  for (const r of all) {
    const [p, q] = r.cpu;
    const total = p + (q ?? 0);
    crow.push([r.label, f1(r.wallMs / 1000), f2(p), q === undefined ? 'n/a' : f2(q), f1((total * 1e6) / requests), f2(total / (r.wallMs / 1000)), f1(r.vmCpu.idle * 100), f1(r.vmCpu.steal * 100)]);
  }
  table(crow);
  process.stdout.write('redis-benchmark itself runs on the same 2 cores and is not counted. VM idle and steal: shares of the whole VM\'s CPU time during the load (/proc/stat); steal is time the hypervisor gave to other VMs.\n\n');

  process.stdout.write('### Checkpoint pause (PVM stopped time): counters over the whole COLO session, events during the load\n\n');
  const prow: (string | number)[][] = [['setup', 'checkpoints', 'periodic', 'mismatch', 'timeout', 'resync', 'mean ms', 'p99 ms', 'max ms', 'mean MiB/ckpt', 'compare matched MiB', 'released by ckpt MiB', 'PVM reply waits for SVM, mean ms', 'events: n', 'events: mean ms', 'events: p99 ms', 'events: max ms', 'load s']];
  for (const r of [...runs[1]!, ...runs[2]!]) {
    const c = r.colo;
    const e = r.eventPauses ?? [];
    const mean = e.length > 0 ? e.reduce((a, b) => a + b, 0) / e.length : NaN;
    const bytes = c?.['mean-checkpoint-bytes'];
    prow.push([
      r.label,
      field(c, 'checkpoints', 0),
      field(c, 'checkpoints-periodic', 0),
      field(c, 'checkpoints-mismatch', 0),
      field(c, 'checkpoints-timeout', 0),
      field(c, 'checkpoints-resync', 0),
      field(c, 'mean-pause-ms'),
      field(c, 'p99-pause-ms'),
      field(c, 'max-pause-ms'),
      typeof bytes === 'number' ? (bytes / 1048576).toFixed(2) : 'n/a',
      mibField(c, 'compare-matched-bytes'),
      mibField(c, 'compare-checkpoint-released-bytes'),
      field(c, 'compare-pvm-wait-mean-ms', 3),
      e.length,
      e.length > 0 ? f1(mean) : 'n/a',
      e.length > 0 ? f1(quantile(e, 0.99)) : 'n/a',
      e.length > 0 ? f1(Math.max(...e)) : 'n/a',
      f1(r.wallMs / 1000),
    ]);
  }
  table(prow);
  process.stdout.write('mean/p99/max ms: the primary\'s query-migrate x-colo counters (whole COLO session, the warm-up included); events: STOP → RESUME timestamps of the primary\'s QMP events during the load only. PVM reply waits for SVM: per chunk the compare released on a match, how long the PVM\'s output had waited for the same bytes from the SVM (0 when the SVM\'s came first): the part of the added latency that is the secondary\'s path; the rest is the primary being slower. Goal for multifd: mean ≤ 5 ms, p99 ≤ 15 ms.\n\n');

  process.stdout.write('### Peak RSS (VmHWM at the end of the load) ÷ guest RAM\n\n');
  const rrow: (string | number)[][] = [['setup', 'primary MiB', 'primary ÷ RAM', 'secondary MiB', 'secondary ÷ RAM']];
  for (const r of results) {
    const [p, s] = r.hwm;
    rrow.push([r.label, mib(p), f2(p / guestRam), mib(s), s === undefined ? 'n/a' : f2(s / guestRam)]);
  }
  table(rrow);
}

/**
 * What lock-step alone costs here: the floor (two lone VMs behind the mirroring proxy, every
 * reply waiting for both) against one lone VM behind the same proxy. If the proxy's hop adds
 * about the same to both, floor ÷ proxied lone is at most what it would be without the hop: an
 * estimate from below of the latency ratio of waiting for two copies on this machine. (Not of
 * ops/s: the floor's second VM runs a front end of its own, which COLO's secondary does not.)
 */
function floorTable(base: LoadResult, proxied: LoadResult, floor: LoadResult, inProcess: LoadResult, colo: LoadResult[], runs: LoadResult[][]): void {
  process.stdout.write('### The lock-step floor: two lone VMs behind a mirroring proxy, and two vCPUs behind one front end; no COLO\n\n');
  const rows: (string | number)[][] = [['setup', 'test', 'ops/s', 'p50 ms', 'p99 ms', 'ops/s ÷ unprotected', 'p50 ÷ unprotected', 'p99 ÷ unprotected', 'ops/s ÷ proxied', 'p50 ÷ proxied', 'p99 ÷ proxied']];
  for (const r of [proxied, floor, inProcess, ...colo]) {
    for (const t of tests) {
      const x = r.rows.get(t)!;
      const b = base.rows.get(t)!;
      const q = proxied.rows.get(t)!;
      rows.push([r.label, t, Math.round(x.rps), f2(x.p50), f2(x.p99), f2(x.rps / b.rps), f2(x.p50 / b.p50), f2(x.p99 / b.p99), f2(x.rps / q.rps), f2(x.p50 / q.p50), f2(x.p99 / q.p99)]);
    }
  }
  table(rows);
  const perRound = tests.map((t) => `${t} ${runs[4]!.map((x, i) => f2(x.rows.get(t)!.p99 / runs[3]![i]!.rows.get(t)!.p99)).join(' ')}`).join('; ');
  process.stdout.write(`p99 of the floor ÷ p99 of the proxied lone VM, per round: ${perRound}. Releases whose lines differed between the two VMs, per round: ${runs[4]!.map((x) => x.differingLines ?? 'n/a').join(' ')} (INCR on one key: each VM gets the 50 connections' requests in its own order, where COLO gives the secondary the primary's order; the timing is the same).\n`);
  const inRound = tests.map((t) => `${t} ${runs[5]!.map((x, i) => f2(x.rows.get(t)!.p99 / runs[0]![i]!.rows.get(t)!.p99)).join(' ')}`).join('; ');
  process.stdout.write(`p99 of the floor in one process ÷ p99 of the unprotected VM, per round: ${inRound}. Released chunks that differed between its two copies, per round: ${runs[5]!.map((x) => x.differingLines ?? 'n/a').join(' ')}.\n`);
  process.stdout.write('The floor in one process (bench/lockstep-vm.ts) is the lone VM with a second vCPU: its own front end gives both copies every input event and writes a reply byte only once both produced it. No hop, no socket between the copies, no checkpoint: ÷ unprotected, it is what waiting for a second copy costs on this machine when nothing else of COLO is left.\n');
  process.stdout.write('The floor mirrors every client byte to both VMs and sends a reply byte only when both produced it (the proxy: bench/lockstep-proxy.c, native; no checkpoints, no state transfer). Its ratio to one lone VM behind the same proxy prices waiting for the later of two copies on this machine, the proxy\'s hop cancelled out (if the hop adds about the same to both, the ratio without it would be higher still): what any lock-stepping system pays before checkpoints, a compare or a mirror of its own. Its ops/s is no floor for COLO, whose secondary takes batched input and runs no front end of its own.\n\n');
}

async function failoverTable(dir: string): Promise<void> {
  process.stdout.write(`### Failover: SIGKILL of the primary → first PING answered by the secondary (${failovers} fresh pairs per mode)\n\n`);
  const rows: (string | number)[][] = [['mode', 'measure', 'median ms', 'max ms', 'runs ms']];
  let stalls = 0;
  for (const channels of [0, 4]) {
    const runs: Failover[] = [];
    for (let i = 0; i < failovers; i++) {
      const r = await failoverOnce(dir, channels);
      if (r === null) stalls += 1;
      else runs.push(r);
    }
    if (runs.length === 0) continue;
    const mode = channels > 0 ? `multifd ${channels}` : 'plain';
    const line = (what: string, xs: number[]): (string | number)[] => [mode, what, f1(median(xs)), f1(Math.max(...xs)), xs.map((x) => x.toFixed(0)).join(' ')];
    rows.push(line('SIGKILL → first PONG', runs.map((r) => r.totalMs)));
    rows.push(line('SIGKILL → lost-heartbeat answered', runs.map((r) => r.heartbeatMs)));
    rows.push(line('SIGKILL → COLO_EXIT received', runs.map((r) => r.exitMs)));
    rows.push(line('SIGKILL → primary reaped', runs.map((r) => r.deadMs)));
  }
  table(rows);
  if (stalls > 0) process.stdout.write(`**${stalls} of ${2 * failovers} pairs stopped checkpointing before the kill** (left out of the table; see above).\n\n`);
  process.stdout.write(`x-colo-lost-heartbeat is sent (out of band) right after the SIGKILL; PING is retried on a new connection every 2 ms. Each run: a fresh pair, 2000 writes per test, two more checkpoints, then the kill.\n\n`);
}
