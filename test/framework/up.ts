/**
 * Helpers for tests of `colo up` (real processes): the supervisor process and its printed
 * lines, its children, and timing the service's return after a failure.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { type TestEnv, coloBin, freePort, guests, pidAlive, pidsUsing, waitFor, withTimeout } from './harness.js';
import { RespClient } from './resp.js';
import { QmpClient } from '../../src/control/qmp-client.js';

/** The `colo up` process: its stdout lines, its stderr, the child pids it reported. */
export class Supervisor {
  lines: string[] = [];
  stderr = '';
  exitCode: number | null = null;
  exitSignal: string | null = null;
  readonly pids = new Set<number>();
  private readonly exited: Promise<void>;
  private partial = '';

  constructor(readonly proc: ReturnType<typeof spawn>) {
    proc.stdout!.on('data', (d: Buffer) => {
      this.partial += d.toString();
      const parts = this.partial.split('\n');
      this.partial = parts.pop()!;
      for (const l of parts) {
        this.lines.push(l);
        this.lineTimes.push(performance.now() - this.startedAt);
        for (const m of l.matchAll(/pid (\d+)|(?:primary|secondary) (\d+)/g)) this.pids.add(Number(m[1] ?? m[2]));
      }
    });
    proc.stderr!.on('data', (d: Buffer) => (this.stderr += d.toString()));
    this.exited = new Promise((r) =>
      proc.once('exit', (code, signal) => {
        this.exitCode = code;
        this.exitSignal = signal;
        r();
      }),
    );
  }

  private readonly startedAt = performance.now();
  /** When each of `lines` was printed, ms since start. */
  private readonly lineTimes: number[] = [];

  /** Every stdout line with the seconds since start, for the test's diagnostics (where a slow run spent its time). */
  timeline(): string {
    return this.lines.map((l, i) => `${(this.lineTimes[i]! / 1000).toFixed(1)}s ${l}`).join(' | ');
  }

  get alive(): boolean {
    return this.exitCode === null && this.exitSignal === null;
  }

  /** Wait for a stdout line matching `re` at index >= `from`; returns its match and index. */
  async line(re: RegExp, from: number, timeoutMs: number): Promise<{ m: RegExpExecArray; at: number }> {
    return waitFor(`colo up to print a line matching ${re} (printed so far: ${JSON.stringify(this.lines)}; stderr tail: ${this.stderr.slice(-1500)})`, () => {
      for (let i = from; i < this.lines.length; i++) {
        const m = re.exec(this.lines[i]!);
        if (m !== null) return { m, at: i };
      }
      if (!this.alive) throw new Error(`colo up exited (code ${this.exitCode}, signal ${this.exitSignal}): ${JSON.stringify(this.lines)} ${this.stderr.slice(-2000)}`);
      return undefined;
    }, timeoutMs);
  }

  waitExit(timeoutMs: number): Promise<void> {
    return withTimeout(this.exited, timeoutMs, 'colo up to exit');
  }
}

export { pidAlive, pidsUsing } from './harness.js';

/** The QMP socket a `colo run` child was given (from its command line). */
export async function qmpOf(pid: number, sup?: Supervisor): Promise<QmpClient> {
  let args: string[];
  try {
    args = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  } catch (err) {
    // Gone already: what colo up printed (and logged) says why.
    const why = sup === undefined ? '' : `; colo up printed: ${sup.timeline()}; its stderr ends: ${sup.stderr.slice(-3000)}`;
    throw new Error(`process ${pid} is gone (${(err as Error).message})${why}`);
  }
  const i = args.indexOf('--qmp');
  assert.ok(i > 0, `process ${pid} has a --qmp option`);
  return QmpClient.connect(args[i + 1]!, { timeoutMs: 5000 });
}

/** Wait until a checkpoint that starts after now has been applied on the secondary (two RESUMEs). */
export async function checkpointAfterNow(secondary: QmpClient): Promise<void> {
  await secondary.waitEvent('RESUME', { after: secondary.eventCount, nth: 2, timeoutMs: 15000 });
}

/** Time from now until a fresh connection on `port` answers GET (polling every 10 ms). */
export async function timeUntilServing(port: number, since: number, timeoutMs: number): Promise<number> {
  const deadline = since + timeoutMs;
  for (;;) {
    try {
      const c = await RespClient.connect(port, '127.0.0.1', 500);
      try {
        await c.command(['GET', 'probe'], 500);
        return performance.now() - since;
      } finally {
        c.close();
      }
    } catch {
      if (performance.now() > deadline) throw new Error(`nothing answered on port ${port} within ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, 10));
    }
  }
}

/** The line `colo up` prints when the pair is protected: the primary's pid, then the secondary's. */
export const protectedLine = /^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/;

/**
 * A `colo up` command line (for `node`) of kv.wasm serving on a free port of 127.0.0.1, with an
 * 8 MiB --drive (kv.img in env.dir), `--memory memory`, `--checkpoint-delay checkpointDelayMs`
 * and its state in env.dir, then `extraArgs`.
 */
export async function kvUpArgs(env: TestEnv, memory: string, checkpointDelayMs: number, extraArgs: string[] = []): Promise<{ args: string[]; port: number; image: string }> {
  const port = await freePort();
  const image = env.image('kv.img', 8 * 1024 * 1024);
  const args = [coloBin, 'up', guests.kv, '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`, '--memory', memory];
  args.push('--checkpoint-delay', String(checkpointDelayMs), '--state-dir', env.dir, ...extraArgs);
  return { args, port, image };
}

/** A `colo up` of kv.wasm that reached `pair: protected`, with what the test must close. */
export interface ProtectedPair {
  sup: Supervisor;
  port: number;
  /** The --drive image (8 MiB). */
  image: string;
  /** The first `pair: protected` line. */
  first: { m: RegExpExecArray; at: number };
  primary: number;
  secondary: number;
  /** Closed at cleanup, before the supervisor is stopped. */
  clients: { close(): unknown }[];
}

/**
 * Spawns `node ARGS` (a `colo up` command line) in env.dir. At cleanup: SIGTERM to the
 * supervisor (after SIGCONT, should a test have stopped it) and up to 10 s for it to stop its
 * children, SIGKILL to it after that, then SIGKILL to anything it left behind (its children have
 * their QMP sockets in the state folder, env.dir); then `after`. `extraEnv`: more environment for it (and so for its children).
 */
export function spawnSupervisor(env: TestEnv, args: string[], after?: () => void, extraEnv?: Record<string, string>): Supervisor {
  const sup = new Supervisor(spawn(process.execPath, args, { cwd: env.dir, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...extraEnv } }));
  env.onCleanup(async () => {
    if (sup.alive) {
      sup.proc.kill('SIGCONT');
      sup.proc.kill('SIGTERM');
      await sup.waitExit(10000).catch(() => sup.proc.kill('SIGKILL'));
    }
    for (const pid of [...sup.pids, ...pidsUsing(env.dir)]) if (pidAlive(pid)) process.kill(pid, 'SIGKILL');
    after?.();
  });
  return sup;
}

/**
 * Starts `colo up` on kv.wasm (256M, a drive, --checkpoint-delay 200, state in env.dir, plus
 * `extraArgs`; serving on `host`) and waits for the pair to be protected. At cleanup: the clients, then SIGTERM to
 * the supervisor, then SIGKILL to anything it left behind (also when it was killed itself; its
 * children have their QMP sockets in the state folder).
 */
export async function startProtectedPair(env: TestEnv, extraArgs: string[] = [], host = '127.0.0.1'): Promise<ProtectedPair> {
  const port = await freePort();
  const image = env.image('kv.img', 8 * 1024 * 1024);
  const args = [coloBin, 'up', guests.kv, '--net', `listen=${host.includes(':') ? `[${host}]` : host}:${port}`, '--drive', `file=${image}`, '--memory', '256M'];
  args.push('--checkpoint-delay', '200', '--state-dir', env.dir, ...extraArgs);
  const sup = spawnSupervisor(env, args);
  const clients: { close(): unknown }[] = [];
  env.onCleanup(async () => {
    for (const c of clients) await c.close();
  });
  const first = await sup.line(/^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 90000);
  return { sup, port, image, first, primary: Number(first.m[1]), secondary: Number(first.m[2]), clients };
}
