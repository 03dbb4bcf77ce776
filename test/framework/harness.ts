/**
 * The process harness for integration tests (ARCHITECTURE §6): real `colo run` processes
 * with QMP sockets, temporary folders, serial files and disks. Everything a test starts is
 * registered with its TestContext and torn down after the test, also when it fails.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import type { TestContext } from 'node:test';
import crypto from 'node:crypto';
import assert from 'node:assert/strict';
import { QmpClient, type QmpEvent } from '../../src/control/qmp-client.js';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const coloBin = path.join(repoRoot, 'dist/src/cli/main.js');
export const guests = {
  memwalk: path.join(repoRoot, 'test/guests/memwalk.wasm'),
  spin: path.join(repoRoot, 'test/guests/spin.wasm'),
  fill: path.join(repoRoot, 'test/guests/fill.wasm'),
  kv: path.join(repoRoot, 'examples/kv/kv.wasm'),
};

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Poll `check` until it returns a value other than undefined/false; fail naming `what`. */
export async function waitFor<T>(what: string, check: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 10000, everyMs = 20): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** `p`, or an error naming `what` after `ms`. */
export async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)));
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

/**
 * How long a `colo run` may take to open its QMP socket. A guest not yet in the
 * instrumentation cache is instrumented first: about 6 s of CPU for fill.wasm, and a test
 * starts two such processes at once; on 2 cores at load 20 that took over 30 s. A process that
 * exits is reported at once (`gone`), so only a real hang waits this long.
 */
export const qmpUpTimeoutMs = 120000;

/**
 * A QMP client for the `colo run` whose socket is `qmpPath`, once the socket exists and
 * answers. `gone()` says why the process can no longer come up (it exited), or null.
 */
export async function connectQmpWhenUp(qmpPath: string, name: string, gone: () => string | null, timeoutMs = qmpUpTimeoutMs): Promise<QmpClient> {
  return QmpClient.connectWhenUp(qmpPath, {
    timeoutMs,
    gone: () => {
      const why = gone();
      return why === null ? null : new Error(`${name} ${why}`);
    },
    timedOut: () => new Error(`timed out after ${timeoutMs} ms waiting for the QMP socket of ${name}`),
  });
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      const port = typeof a === 'object' && a !== null ? a.port : 0;
      s.close(() => resolve(port));
    });
  });
}

export interface VmSpec {
  name: string;
  guest: string;
  args?: string[];
  guestArgs?: string[];
  /** Extra environment for the process. */
  env?: Record<string, string>;
  /** Skip the QMP connection (for tests of refusals that exit at once). */
  noQmp?: boolean;
}

/** One `colo run` process. */
export class VmProcess {
  readonly qmpPath: string;
  readonly serialPath: string;
  stderr = '';
  stdout = '';
  exitCode: number | null = null;
  exitSignal: NodeJS.Signals | null = null;
  qmp!: QmpClient;
  private readonly exited: Promise<void>;

  constructor(readonly env: TestEnv, readonly spec: VmSpec, readonly child: ChildProcess) {
    this.qmpPath = path.join(env.dir, `${spec.name}.qmp`);
    this.serialPath = path.join(env.dir, `${spec.name}.serial`);
    child.stdout?.on('data', (d: Buffer) => (this.stdout += d.toString()));
    child.stderr?.on('data', (d: Buffer) => (this.stderr += d.toString()));
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.exitCode = code;
        this.exitSignal = signal;
        resolve();
      });
    });
  }

  get alive(): boolean {
    return this.exitCode === null && this.exitSignal === null;
  }

  serial(): string {
    try {
      return fs.readFileSync(this.serialPath, 'latin1');
    } catch {
      return '';
    }
  }

  /** Wait until the serial output contains `marker` at least `count` times (counting from `fromOffset`). */
  async waitSerial(marker: string, opts: { count?: number; fromOffset?: number; timeoutMs?: number } = {}): Promise<void> {
    const count = opts.count ?? 1;
    await waitFor(`${count}× '${marker}' on the serial console of ${this.spec.name}`, () => {
      if (!this.alive) throw new Error(`${this.spec.name} exited (code ${this.exitCode}, signal ${this.exitSignal}) while waiting for '${marker}' on its serial: ${this.stderr.slice(-2000)}`);
      const s = this.serial().slice(opts.fromOffset ?? 0);
      return s.split(marker).length - 1 >= count;
    }, opts.timeoutMs ?? 15000);
  }

  async waitExit(timeoutMs = 10000): Promise<number | null> {
    let timer: NodeJS.Timeout | undefined;
    const t = new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), timeoutMs)));
    const r = await Promise.race([this.exited.then(() => 'exited' as const), t]);
    clearTimeout(timer);
    if (r === 'timeout') throw new Error(`timed out after ${timeoutMs} ms waiting for ${this.spec.name} to exit`);
    return this.exitCode;
  }

  kill(signal: NodeJS.Signals = 'SIGKILL'): void {
    if (this.alive) this.child.kill(signal);
  }

  /** Lines logged at error level. */
  errorLines(): string[] {
    return this.stderr.split('\n').filter((l) => / error /.test(l) || /^colo(?: run)?: /.test(l));
  }

  /** Quit through QMP (or SIGTERM, then SIGKILL) and wait for the exit. */
  async stop(): Promise<void> {
    if (!this.alive) {
      await this.qmp?.close().catch(() => undefined);
      return;
    }
    try {
      await this.qmp?.execute('quit', {}, { timeoutMs: 2000 });
    } catch {
      // fall through to signals
    }
    await this.qmp?.close().catch(() => undefined);
    try {
      await this.waitExit(3000);
    } catch {
      this.kill('SIGKILL');
      await this.waitExit(3000).catch(() => undefined);
    }
  }

  async pmem(addr: number, size: number): Promise<Buffer> {
    const file = path.join(this.env.dir, `${this.spec.name}-pmem-${Date.now()}-${Math.random().toString(16).slice(2)}.bin`);
    await this.qmp.execute('pmemsave', { val: addr, size, filename: file });
    const b = fs.readFileSync(file);
    fs.rmSync(file, { force: true });
    return b;
  }

  async status(): Promise<string> {
    const r = await this.qmp.execute<{ status: string }>('query-status');
    return r.status;
  }

  async migrationStatus(): Promise<string> {
    const r = await this.qmp.execute<{ status?: string }>('query-migrate');
    return r.status ?? 'none';
  }

  /** Wait for a QMP event (counting from `after`, an earlier `qmp.eventCount`; default: all since connect). */
  async waitEvent(name: string, opts: { after?: number; where?: (e: QmpEvent) => boolean; nth?: number; timeoutMs?: number } = {}): Promise<QmpEvent> {
    return this.qmp.waitEvent(name, { timeoutMs: 30000, ...opts });
  }

  /** Events of `name` received so far (since `after`). */
  eventsOf(name: string, after = 0): QmpEvent[] {
    return this.qmp.events.filter((e) => e.index >= after && e.event === name);
  }

  /** migrate-set-capabilities and migrate-set-parameters in one call. */
  async setMigration(capabilities: Record<string, boolean>, parameters: Record<string, number> = {}): Promise<void> {
    const caps = Object.entries(capabilities).map(([capability, state]) => ({ capability, state }));
    if (caps.length > 0) await this.qmp.execute('migrate-set-capabilities', { capabilities: caps });
    if (Object.keys(parameters).length > 0) await this.qmp.execute('migrate-set-parameters', parameters);
  }

  /** `migrate-incoming uri=tcp:127.0.0.1:0` on a `--incoming defer` VM; returns the bound port (query-migrate's socket-address). */
  async listenIncoming(host = '127.0.0.1'): Promise<number> {
    await this.qmp.execute('migrate-incoming', { uri: `tcp:${host}:0` });
    const r = await this.qmp.execute<{ 'socket-address'?: { port: string }[] }>('query-migrate');
    const port = Number(r['socket-address']?.[0]?.port);
    if (!Number.isInteger(port) || port <= 0) throw new Error(`${this.spec.name}: query-migrate shows no listening port: ${JSON.stringify(r)}`);
    return port;
  }

  /**
   * `migrate` to tcp:127.0.0.1:`port` (where `target` listens), then wait for migration status
   * colo here and for `target`'s first RESUME since it connected (its SVM started), each within
   * `timeoutMs`.
   */
  async migrateIntoColo(target: VmProcess, port: number, timeoutMs = 30000): Promise<void> {
    await this.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    await this.waitMigrationStatus('colo', timeoutMs);
    await target.waitEvent('RESUME', { timeoutMs });
  }

  /** yank the migration channels (QMP yank, instance type migration). */
  async yankMigration(): Promise<void> {
    await this.qmp.execute('yank', { instances: [{ type: 'migration' }] });
  }

  /**
   * Pause the VM, read the memwalk region and check its pattern (ARCHITECTURE §6); returns
   * null when it holds. The VM is left paused.
   */
  async memwalkCheck(regionIn?: { start: number; size: number }): Promise<string | null> {
    const region = regionIn ?? memwalkRegion(this.serial());
    if (region === undefined) throw new Error(`${this.spec.name}: memwalk has not printed its region`);
    await this.qmp.execute('stop');
    return checkMemwalkPattern(await this.pmem(region.start, region.size));
  }

  /** Number of memwalk passes ('B' markers) on the serial console so far. */
  passes(): number {
    const s = this.serial();
    return s.length - s.lastIndexOf('\n') - 1;
  }

  async waitMigrationStatus(want: string | string[], timeoutMs = 30000): Promise<Record<string, unknown>> {
    const wanted = Array.isArray(want) ? want : [want];
    return waitFor(`migration status ${wanted.join('|')} on ${this.spec.name}`, async () => {
      const r = await this.qmp.execute<Record<string, unknown>>('query-migrate');
      const s = (r.status as string | undefined) ?? 'none';
      if (wanted.includes(s)) return r;
      if ((s === 'failed' || s === 'cancelled') && !wanted.includes(s)) {
        throw new Error(`${this.spec.name}: migration ended in ${s}: ${String(r['error-desc'] ?? '')}`);
      }
      return undefined;
    }, timeoutMs, 25);
  }
}

/** Processes whose command line names a unix socket in `dir` (the QMP sockets of a test's `colo run` processes, `colo up`'s children included). */
export function pidsUsing(dir: string): number[] {
  const out: number[] = [];
  for (const e of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(e) || Number(e) === process.pid) continue;
    try {
      if (fs.readFileSync(`/proc/${e}/cmdline`, 'utf8').includes(`unix:${dir}/`)) out.push(Number(e));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** A test's temporary folder and the processes it started. */
export class TestEnv {
  readonly dir: string;
  private readonly vms: VmProcess[] = [];
  private readonly cleanups: (() => Promise<void> | void)[] = [];
  /**
   * The test has ended and cleaned up. A test body that goes on after its test failed (an
   * uncaught exception fails the test at once) must not start processes nobody would stop:
   * they would keep the test file, and so the whole run, alive.
   */
  private ended = false;

  constructor(t: TestContext) {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-test-'));
    t.after(() => this.cleanup());
  }

  file(name: string): string {
    return path.join(this.dir, name);
  }

  onCleanup(fn: () => Promise<void> | void): void {
    if (this.ended) void Promise.resolve().then(fn);
    else this.cleanups.push(fn);
  }

  /**
   * Mount a tmpfs of `size` (mount's syntax: `2m`) at `name` in the test folder, unmounted at
   * cleanup after the processes that use it are gone (tests that need it run as root, as CI).
   */
  async tmpfs(name: string, size: string): Promise<string> {
    const mnt = this.file(name);
    fs.mkdirSync(mnt);
    // Registered before the mount and before any process the test starts: it runs last.
    this.onCleanup(async () => {
      await runProgram('umount', ['-l', mnt], { timeoutMs: 10000 });
    });
    const mount = await runProgram('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', mnt], { timeoutMs: 10000 });
    assert.equal(mount.code, 0, `mounting a ${size} tmpfs for the test (needs root): ${mount.stderr}`);
    return mnt;
  }

  /** sha256 of a file. */
  hashFile(p: string): string {
    return crypto.createHash('sha256').update(fs.readFileSync(p)).digest('hex');
  }

  /** A raw image of `bytes` filled by `fill` (default zeros). */
  image(name: string, bytes: number, fill?: (b: Buffer) => void): string {
    const p = this.file(name);
    const b = Buffer.alloc(bytes);
    fill?.(b);
    fs.writeFileSync(p, b);
    return p;
  }

  /** Start `colo run` with a QMP socket and a serial file; resolves once QMP answers. */
  async startVm(spec: VmSpec): Promise<VmProcess> {
    if (this.ended) throw new Error(`the test already ended; not starting ${spec.name}`);
    const qmpPath = path.join(this.dir, `${spec.name}.qmp`);
    const serialPath = path.join(this.dir, `${spec.name}.serial`);
    const args = [coloBin, 'run', spec.guest, '--name', spec.name, '--serial', `file:${serialPath}`];
    if (!spec.noQmp) args.push('--qmp', `unix:${qmpPath}`);
    args.push(...(spec.args ?? []));
    if (spec.guestArgs !== undefined) args.push('--', ...spec.guestArgs);
    const child = spawn(process.execPath, args, { cwd: this.dir, env: { ...process.env, ...spec.env }, stdio: ['ignore', 'pipe', 'pipe'] });
    const vm = new VmProcess(this, spec, child);
    this.vms.push(vm);
    if (spec.noQmp) return vm;
    vm.qmp = await connectQmpWhenUp(qmpPath, spec.name, () => (vm.alive ? null : `exited with code ${vm.exitCode} before its QMP socket came up: ${vm.stderr.trim()}`));
    return vm;
  }

  async cleanup(): Promise<void> {
    this.ended = true;
    await Promise.all(this.vms.map((vm) => vm.stop().catch(() => vm.kill('SIGKILL'))));
    // Warnings and errors of the processes go to the runner's stderr, so a failure in CI
    // comes with what each node said about it.
    for (const vm of this.vms) {
      const notable = vm.stderr.split('\n').filter((l) => / (warn|error) /.test(l));
      if (notable.length > 0) process.stderr.write(`[${vm.spec.name} in ${this.dir}]\n${notable.slice(-20).join('\n')}\n`);
    }
    // Every cleanup runs even when one before it fails (an unmount must not be skipped because
    // closing a client threw); the first failure is reported after all of them.
    let first: unknown = null;
    for (const fn of this.cleanups.reverse()) {
      try {
        await fn();
      } catch (err) {
        first ??= err;
      }
    }
    // Anything still running with a socket in the test folder was started by the test, if not
    // directly (a `colo up` a refusal test expected to exit at once, killed by runProgram's
    // timeout, leaves its children): it must not outlive the test.
    for (const pid of pidsUsing(this.dir)) {
      process.stderr.write(`[${this.dir}] killing process ${pid}, left running by the test\n`);
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone meanwhile
      }
    }
    if (process.env.COLO_KEEP_TEST_DIR === undefined) fs.rmSync(this.dir, { recursive: true, force: true });
    if (first !== null) throw first;
  }
}

/** A lone kv.wasm VM (named kv, 64M) serving on a free port of 127.0.0.1, once it printed `kv ready`. */
export async function startKvVm(env: TestEnv): Promise<{ vm: VmProcess; port: number }> {
  const port = await freePort();
  const vm = await env.startVm({ name: 'kv', guest: guests.kv, args: ['--net', `listen=127.0.0.1:${port}`, '--memory', '64M'] });
  await vm.waitSerial('kv ready');
  return { vm, port };
}

/**
 * Two kv.wasm VMs started at once on the same `args`: `src` (`o.src` added) and `dst` (`o.dst`
 * added), which waits for an incoming migration (--incoming defer); `o.env` for both.
 */
export async function startKvSourceAndTarget(env: TestEnv, args: string[], o: { src?: string[]; dst?: string[]; env?: Record<string, string> } = {}): Promise<[VmProcess, VmProcess]> {
  const vmEnv = o.env === undefined ? {} : { env: o.env };
  return Promise.all([
    env.startVm({ name: 'src', guest: guests.kv, args: [...args, ...(o.src ?? [])], ...vmEnv }),
    env.startVm({ name: 'dst', guest: guests.kv, args: [...args, ...(o.dst ?? []), '--incoming', 'defer'], ...vmEnv }),
  ]);
}

/** memwalk prints `memwalk start=0x<hex> size=<n>` once. */
export function memwalkRegion(serial: string): { start: number; size: number } | undefined {
  const m = /memwalk start=0x([0-9a-f]+) size=(\d+)/.exec(serial);
  if (m === null) return undefined;
  return { start: parseInt(m[1]!, 16), size: Number(m[2]) };
}

/**
 * The memwalk invariant: the first byte of each 4 KiB page reads N+1 … N+1, N … N (mod 256),
 * one step down at most. Returns null when the pattern holds, else a description.
 */
export function checkMemwalkPattern(region: Buffer): string | null {
  const pages = Math.floor(region.byteLength / 4096);
  if (pages === 0) return 'empty region';
  const first = region[0]!;
  let steps = 0;
  for (let i = 1; i < pages; i++) {
    const prev = region[(i - 1) * 4096]!;
    const cur = region[i * 4096]!;
    if (cur === prev) continue;
    if (((prev - cur) & 0xff) === 1) {
      steps++;
      if (steps > 1) return `second step down at page ${i} (${prev} → ${cur})`;
      continue;
    }
    return `page ${i} reads ${cur} after ${prev} (first page ${first})`;
  }
  return null;
}

/** Run a program to completion, with a timeout. */
export function runProgram(cmd: string, args: string[], opts: { timeoutMs?: number; cwd?: string; input?: string; env?: Record<string, string> } = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    // No input: stdin is /dev/null, so a program that exits at once (mount) cannot make our
    // write to its stdin fail with EPIPE.
    const child = spawn(cmd, args, { cwd: opts.cwd, env: opts.env === undefined ? process.env : { ...process.env, ...opts.env }, stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`timed out after ${opts.timeoutMs ?? 60000} ms waiting for ${cmd} ${args.join(' ')}: ${stderr.slice(-500)}`));
    }, opts.timeoutMs ?? 60000);
    child.once('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
    if (child.stdin !== null) {
      // A program may exit without reading its input; its exit status says what happened.
      child.stdin.on('error', () => undefined);
      child.stdin.end(opts.input);
    }
  });
}
