/**
 * `colo up` acceptance (real processes): kv.wasm as a supervised pair. SIGKILL the primary
 * child: the service answers again on the same address within 1 s, the pair is protected
 * again (a new secondary in COLO) and every acknowledged key is still there; the same with the
 * secondary child SIGKILLed (the primary keeps serving). Plain and multifd checkpoints.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { TestEnv, coloBin, freePort, guests, waitFor } from '../framework/harness.js';
import { AckedWriter, RespClient, countMissing } from '../framework/resp.js';
import { QmpClient } from '../../src/control/qmp-client.js';

/** The `colo up` process: its stdout lines, its stderr, the child pids it reported. */
class Supervisor {
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

async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)));
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

/** Processes whose command line mentions `dir`. */
function pidsUsing(dir: string): number[] {
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

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** The QMP socket a `colo run` child was given (from its command line). */
async function qmpOf(pid: number): Promise<QmpClient> {
  const args = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  const i = args.indexOf('--qmp');
  assert.ok(i > 0, `process ${pid} has a --qmp option`);
  return QmpClient.connect(args[i + 1]!, { timeoutMs: 5000 });
}

/** Wait until a checkpoint that starts after now has been applied on the secondary (two RESUMEs). */
async function checkpointAfterNow(secondary: QmpClient): Promise<void> {
  await secondary.waitEvent('RESUME', { after: secondary.eventCount, nth: 2, timeoutMs: 15000 });
}

/** Time from now until a fresh connection on `port` answers GET (polling every 10 ms). */
async function timeUntilServing(port: number, since: number, timeoutMs: number): Promise<number> {
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

for (const transport of ['plain', 'multifd'] as const) {
  test(`colo up/${transport}: failover on SIGKILL of either child, within 1 s, then protected again`, async (t) => {
    const env = new TestEnv(t);
    const port = await freePort();
    const image = env.image('kv.img', 8 * 1024 * 1024);
    const args = [coloBin, 'up', guests.kv, '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`, '--memory', '256M'];
    args.push('--checkpoint-delay', '200', '--state-dir', env.dir);
    if (transport === 'multifd') args.push('--parallel-connections', '2');
    const sup = new Supervisor(spawn(process.execPath, args, { cwd: env.dir, stdio: ['ignore', 'pipe', 'pipe'] }));
    const clients: { close(): unknown }[] = [];
    env.onCleanup(async () => {
      for (const c of clients) await c.close();
      if (sup.alive) {
        sup.proc.kill('SIGTERM');
        await sup.waitExit(10000).catch(() => sup.proc.kill('SIGKILL'));
      }
      // Whatever it left behind (also when it was killed itself): its children have their QMP
      // sockets in the state folder.
      for (const pid of [...sup.pids, ...pidsUsing(env.dir)]) if (pidAlive(pid)) process.kill(pid, 'SIGKILL');
    });

    const first = await sup.line(/^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 90000);
    const [p1, s1] = [Number(first.m[1]), Number(first.m[2])];
    const s1q = await qmpOf(s1);
    clients.push(s1q);

    // 1. The primary dies.
    const w1 = await AckedWriter.start(port, 'a:');
    clients.push({ close: () => w1.stop() });
    await waitFor('200 acknowledged writes', () => w1.acked.size >= 200, 20000);
    // Killed while the client writes, at no particular point of a checkpoint: with the
    // network compare, whatever the client saw acknowledged is on the secondary.
    const killedAt = performance.now();
    process.kill(p1, 'SIGKILL');
    const primaryFailoverMs = await timeUntilServing(port, killedAt, 5000);
    t.diagnostic(`${transport}: the service answered ${primaryFailoverMs.toFixed(0)} ms after the primary's SIGKILL`);
    assert.ok(primaryFailoverMs < 1000, `the service answers within 1 s of the primary's death (took ${primaryFailoverMs.toFixed(0)} ms)`);
    await withTimeout(w1.ended(), 5000, "the writer's connection to the dead primary to end");
    const acked = new Map(w1.acked);
    const took = await sup.line(new RegExp(`^pair: primary died \\(SIGKILL\\); secondary ${s1} took over on 127\\.0\\.0\\.1:${port}$`), first.at + 1, 5000);
    const second = await sup.line(new RegExp(`^pair: protected \\(primary pid ${s1}, secondary pid (\\d+)\\)$`), took.at + 1, 60000);
    assert.ok(sup.lines.slice(took.at + 1, second.at).includes('pair: re-protecting'), `re-protecting is reported: ${JSON.stringify(sup.lines)}`);
    const s2 = Number(second.m[1]);
    const [p2q, s2q] = [s1q, await qmpOf(s2)];
    clients.push(s2q);
    assert.equal((await p2q.execute<{ status: string }>('query-migrate')).status, 'colo', 'the new primary is in COLO');
    await checkpointAfterNow(s2q);

    const r1 = await RespClient.connect(port);
    clients.push(r1);
    assert.equal(await countMissing(r1, acked), 0, 'every key the primary acknowledged survived it');

    // 2. The secondary dies: the primary keeps serving, then is protected again.
    const w2 = await AckedWriter.start(port, 'b:');
    clients.push({ close: () => w2.stop() });
    await waitFor('200 more acknowledged writes', () => w2.acked.size >= 200, 20000);
    const mark = second.at + 1;
    const killed2At = performance.now();
    process.kill(s2, 'SIGKILL');
    const before = w2.acked.size;
    await waitFor('writes acknowledged after the secondary died', () => w2.acked.size >= before + 50, 1000, 5);
    const secondaryFailoverMs = performance.now() - killed2At;
    t.diagnostic(`${transport}: 50 more writes acknowledged ${secondaryFailoverMs.toFixed(0)} ms after the secondary's SIGKILL`);
    const cont = await sup.line(new RegExp(`^pair: secondary died \\(SIGKILL\\); primary ${s1} continues unprotected$`), mark, 5000);
    const third = await sup.line(new RegExp(`^pair: protected \\(primary pid ${s1}, secondary pid (\\d+)\\)$`), cont.at + 1, 60000);
    assert.ok(sup.lines.slice(cont.at + 1, third.at).includes('pair: re-protecting'));
    const s3q = await qmpOf(Number(third.m[1]));
    clients.push(s3q);
    assert.equal((await p2q.execute<{ status: string }>('query-migrate')).status, 'colo', 'the primary is in COLO with the third secondary');
    await w2.stop();
    const acked2 = new Map([...acked, ...w2.acked]);
    await checkpointAfterNow(s3q);
    const r2 = await RespClient.connect(port);
    clients.push(r2);
    assert.equal(await countMissing(r2, acked2), 0, 'every acknowledged key is still there');

    t.diagnostic(`${transport}: ${sup.timeline()}`);

    // 3. SIGTERM: both children go, and so does colo up.
    sup.proc.kill('SIGTERM');
    await sup.waitExit(15000);
    assert.equal(sup.exitCode, 0, sup.stderr.slice(-2000));
    assert.equal(sup.lines.at(-1), 'pair: stopped');
    for (const pid of sup.pids) assert.ok(!pidAlive(pid), `process ${pid} is gone`);

    // The last primary's disk is back in the --drive image: a fresh kv replays every key.
    const again = await env.startVm({ name: 'again', guest: guests.kv, args: ['--memory', '256M', '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`] });
    await again.waitSerial('kv ready');
    const r3 = await RespClient.connect(port);
    clients.push(r3);
    assert.equal(await countMissing(r3, acked2), 0, 'the --drive image holds every acknowledged key');
    const errors = sup.stderr.split('\n').filter((l) => / error /.test(l) || /^colo/.test(l));
    assert.deepEqual(errors, [], 'no error-level log lines from colo up or its children');
  });
}
