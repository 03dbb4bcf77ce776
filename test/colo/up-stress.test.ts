/**
 * `colo up` under stress (real processes), the short form of tools/stress-reprotect.sh: kv.wasm
 * under redis-benchmark load, every migration and checkpoint checked page by page
 * (COLO_VERIFY_RAM=1), the primary and the secondary SIGKILLed in turn at random points of the
 * checkpoint cycle. Each time the pair must be protected again, with no RAM difference, no
 * crashed or exited guest, no error-level log line, and what a client saw acknowledged (an INCR
 * counter, SET values) still there on the node that serves, and at the end in the --drive image.
 *
 * Kills come before the protection has lasted limits.upProtectStableMs, so each one is a
 * failed attempt: the pauses grow (1 s, 2 s, ...), and the run stays below
 * limits.upProtectAttemptsMax of them, after which colo up waits a minute between attempts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { TestEnv, guests, waitFor, withTimeout } from '../framework/harness.js';
import { RespClient } from '../framework/resp.js';
import { rng } from '../framework/rng.js';
import { type Supervisor, checkpointAfterNow, kvUpArgs, pidAlive, protectedLine, qmpOf, spawnSupervisor } from '../framework/up.js';
import { limits } from '../../src/core/limits.js';

/** Kills per variant: each a failed attempt (see above), one fewer than colo up gives up after. */
const kills = limits.upProtectAttemptsMax - 1;

/**
 * One client over failovers: INCR of one counter and a SET of a new key, in turn, reconnecting
 * when the connection goes away. An INCR answer at or below the last acknowledged one is a lost
 * write (recorded in `backwards`; the loop goes on).
 */
class FailoverClient {
  readonly acked = new Map<string, string>();
  counter = 0;
  backwards: string[] = [];
  reconnects = 0;
  private client: RespClient | null = null;
  private stopped = false;
  private readonly loop: Promise<void>;

  constructor(private readonly port: number) {
    this.loop = this.run();
  }

  private async run(): Promise<void> {
    for (let i = 0; !this.stopped; i++) {
      try {
        if (this.client === null) {
          this.client = await RespClient.connect(this.port, '127.0.0.1', 1000);
          this.reconnects++;
        }
        const v = await this.client.command(['INCR', 'stress:counter'], 5000);
        if (typeof v !== 'number') throw new Error(`INCR answered ${String(v)}`);
        if (v <= this.counter) this.backwards.push(`INCR answered ${v} after ${this.counter}`);
        this.counter = Math.max(this.counter, v);
        const key = `stress:${i}`;
        const value = `v${i}-${'x'.repeat(i % 64)}`;
        if ((await this.client.command(['SET', key, value], 5000)) === 'OK') this.acked.set(key, value);
      } catch {
        // The node it talked to died (or is not serving yet): a failover; again on a new connection.
        this.client?.close();
        this.client = null;
        if (!this.stopped) await new Promise((r) => setTimeout(r, 20));
      }
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.client?.close();
    await this.loop;
  }
}

/** redis-benchmark SET/INCR, started again whenever it ends (a failover closes its connections), until stopped. */
function startLoad(port: number): { stop(): Promise<void>; runs: () => number; error: () => Error | null } {
  let stopped = false;
  let proc: ChildProcess | null = null;
  let runs = 0;
  let error: Error | null = null;
  let done: () => void = () => {};
  const finished = new Promise<void>((r) => (done = r));
  const next = (): void => {
    if (stopped) return done();
    runs++;
    proc = spawn('redis-benchmark', ['-h', '127.0.0.1', '-p', String(port), '-n', '2000000', '-c', '4', '-r', '100000', '-t', 'set,incr', '-q'], { stdio: 'ignore' });
    proc.once('error', (err) => (error = err));
    proc.once('close', () => setTimeout(next, 50));
  };
  next();
  return {
    runs: () => runs,
    error: () => error,
    async stop() {
      stopped = true;
      proc?.kill('SIGKILL');
      await withTimeout(finished, 5000, 'the redis-benchmark loop to end');
    },
  };
}

/** Lines of colo up's log (its own and its children's) that say a check found something. */
function findings(sup: Supervisor): string[] {
  return sup.stderr.split('\n').filter((l) => / error /.test(l) || /differs from the source|guest crashed|guest exited with code/.test(l));
}

/** How many of `expected` do not read back with their value (GETs pipelined 200 at a time). */
async function missingKeys(client: RespClient, expected: ReadonlyMap<string, string>): Promise<string[]> {
  const entries = [...expected];
  const missing: string[] = [];
  for (let i = 0; i < entries.length; i += 200) {
    const batch = entries.slice(i, i + 200);
    const got = await Promise.all(batch.map(([k]) => client.command(['GET', k], 10000)));
    batch.forEach(([k, v], j) => {
      if (got[j] !== v) missing.push(`${k}=${JSON.stringify(got[j])}`);
    });
  }
  return missing;
}

for (const { transport, extra } of [
  { transport: 'plain', extra: [] as string[] },
  { transport: 'multifd', extra: ['--parallel-connections', '2'] },
]) {
  test(`colo up/${transport} under load with COLO_VERIFY_RAM=1: ${kills} SIGKILLs of the primary and the secondary in turn, protected again each time, no RAM difference, every acknowledged write kept`, { timeout: 150000 }, async (t) => {
    const env = new TestEnv(t);
    const started = performance.now();
    const seed = Math.floor(Math.random() * 2 ** 31);
    const random = rng(seed);
    t.diagnostic(`${transport}: seed ${seed}`);
    const { args, port, image } = await kvUpArgs(env, '256M', 200, extra);
    const sup = spawnSupervisor(env, args, undefined, { COLO_VERIFY_RAM: '1' });
    let last = await sup.line(protectedLine, 0, 90000);

    const load = startLoad(port);
    env.onCleanup(() => load.stop());
    const client = new FailoverClient(port);
    env.onCleanup(() => client.stop());
    await waitFor('100 acknowledged SETs before the first kill', () => client.acked.size >= 100 || undefined, 30000);

    const fail = (what: string): string => `${what} (seed ${seed}); colo up printed: ${sup.timeline()}; its log's notable lines: ${sup.stderr.split('\n').filter((l) => / (warn|error) /.test(l)).slice(-30).join(' | ')}`;
    for (let k = 0; k < kills; k++) {
      const who = k % 2 === 0 ? 'primary' : 'secondary';
      const [primary, secondary] = [Number(last.m[1]), Number(last.m[2])];
      // At a random point of the checkpoint cycle (200 ms, plus the checkpoint itself).
      await new Promise((r) => setTimeout(r, Math.floor(random() * 1000)));
      const ackedBefore = new Map(client.acked);
      const counterBefore = client.counter;
      const victim = who === 'primary' ? primary : secondary;
      process.kill(victim, 'SIGKILL');
      await waitFor(`the ${who} ${victim} to be gone`, () => !pidAlive(victim), 5000);
      // Protected again: failed attempt k + 1 waits k + 1 s before the new secondary is started.
      last = await sup.line(protectedLine, last.at + 1, 60000).catch((err: unknown) => {
        throw new Error(fail(`kill ${k + 1} (the ${who}): not protected again: ${(err as Error).message.slice(0, 300)}`));
      });
      const survivor = who === 'primary' ? secondary : primary;
      assert.equal(Number(last.m[1]), survivor, fail(`the ${who}'s partner ${survivor} is the primary after kill ${k + 1}`));
      // A secondary that fails a checkpoint (a RAM difference) dies: the wait says what the log says.
      const sq = await qmpOf(Number(last.m[2]), sup);
      try {
        await checkpointAfterNow(sq);
      } catch (err) {
        throw new Error(fail(`kill ${k + 1} (the ${who}): no checkpoint applied on the new secondary: ${(err as Error).message}; findings: ${JSON.stringify(findings(sup))}`));
      } finally {
        sq.close();
      }
      // What was acknowledged before the kill is on the node that serves now.
      const reader = await RespClient.connect(port, '127.0.0.1', 5000);
      try {
        const counter = await reader.command(['GET', 'stress:counter'], 10000);
        assert.ok(Number(counter) >= counterBefore, fail(`the counter reads ${String(counter)} after kill ${k + 1}, below the ${counterBefore} acknowledged before it`));
        assert.deepEqual((await missingKeys(reader, ackedBefore)).slice(0, 10), [], fail(`acknowledged SETs missing after kill ${k + 1} (of ${ackedBefore.size})`));
      } finally {
        reader.close();
      }
      assert.deepEqual(findings(sup), [], fail(`no RAM difference, crashed or exited guest, or error-level line after kill ${k + 1}`));
      t.diagnostic(`${transport}: kill ${k + 1} (the ${who}) at ${((performance.now() - started) / 1000).toFixed(1)} s: protected again, ${ackedBefore.size} SETs and counter ${counterBefore} kept`);
    }

    // Still serving: the client goes on after the last failover.
    const after = client.acked.size;
    await waitFor(`the client to be answered after the last re-protection (${client.acked.size} of ${after} + 50 SETs)`, () => client.acked.size >= after + 50 || undefined, 20000);
    await client.stop();
    await load.stop();
    assert.deepEqual(client.backwards, [], fail('the INCR counter never went backwards'));
    assert.equal(load.error(), null, 'redis-benchmark ran');
    const protections = sup.lines.filter((l) => protectedLine.test(l)).length;
    assert.equal(protections, 1 + kills, fail('one protection at start, one after each kill'));

    sup.proc.kill('SIGTERM');
    await sup.waitExit(15000);
    assert.equal(sup.exitCode, 0, fail('colo up exits 0 on SIGTERM'));
    assert.deepEqual(findings(sup), [], fail('no RAM difference, crashed or exited guest, or error-level line'));

    // The last primary's disk is back in the --drive image: a fresh kv replays every acknowledged write.
    const again = await env.startVm({ name: 'again', guest: guests.kv, args: ['--memory', '256M', '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`] });
    await again.waitSerial('kv ready');
    const replay = await RespClient.whenServing(port, 'kv on the --drive image');
    env.onCleanup(() => replay.close());
    const counter = await replay.command(['GET', 'stress:counter'], 10000);
    assert.ok(Number(counter) >= client.counter, `the --drive image holds the counter at ${String(counter)}, at least the ${client.counter} acknowledged`);
    assert.deepEqual((await missingKeys(replay, client.acked)).slice(0, 10), [], `the --drive image holds every acknowledged SET (of ${client.acked.size})`);
    assert.deepEqual(again.errorLines(), []);
    t.diagnostic(`${transport}: ${kills} kills in ${((performance.now() - started) / 1000).toFixed(1)} s, ${client.acked.size} SETs, counter ${client.counter}, ${client.reconnects} connections, ${load.runs()} redis-benchmark runs`);
  });
}
