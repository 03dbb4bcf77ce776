/**
 * `colo up` (real processes) when more goes wrong than one child: the supervisor itself is
 * sent SIGHUP (its terminal or ssh session closed); the secondary that is taking over dies
 * too (a double failure), or hangs for longer than the failover timeout; the reader of its
 * stdout goes away; the primary dies, or the pair is stopped, during the initial migration.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { RespClient } from '../framework/resp.js';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import net from 'node:net';
import { TestEnv, coloBin, freePort, guests, sleep, waitFor, withTimeout } from '../framework/harness.js';
import { limits } from '../../src/core/limits.js';
import { Supervisor, pidAlive, pidsUsing, qmpOf, spawnSupervisor, startProtectedPair, type ProtectedPair } from '../framework/up.js';
import { exitOnConnectGuest, watGuest } from '../framework/machine.js';

function tail(pair: ProtectedPair): string {
  return `colo up printed: ${pair.sup.timeline()}; its stderr ends: ${pair.sup.stderr.slice(-2000)}`;
}

test('colo up: SIGHUP stops the pair like SIGTERM: both children are gone and colo up exits 0', async (t) => {
  const env = new TestEnv(t);
  const pair = await startProtectedPair(env);
  const { sup, primary, secondary } = pair;
  sup.proc.kill('SIGHUP');
  await sup.waitExit(15000);
  assert.equal(sup.exitSignal, null, `colo up ended by its own exit, not by the signal; ${tail(pair)}`);
  assert.equal(sup.exitCode, 0, tail(pair));
  assert.deepEqual(sup.lines.slice(-2), ['pair: stopping (SIGHUP)', 'pair: stopped'], tail(pair));
  await waitFor('both children to be gone', () => !pidAlive(primary) && !pidAlive(secondary), 5000);
  assert.deepEqual(pidsUsing(env.dir), [], 'no process of the pair is left');
});

test('colo up: SIGTERM while the primary is stopped (SIGSTOP): it is killed after the stop timeout, and the log says so (no silent SIGKILL)', async (t) => {
  const env = new TestEnv(t);
  const pair = await startProtectedPair(env);
  const { sup, primary, secondary } = pair;
  // Frozen, then the pair is stopped at once (before the heartbeat would fence it).
  process.kill(primary, 'SIGSTOP');
  sup.proc.kill('SIGTERM');
  await sup.waitExit(limits.upStopTimeoutMs + 10000);
  assert.equal(sup.exitCode, 0, tail(pair));
  assert.deepEqual(sup.lines.slice(-2), ['pair: stopping (SIGTERM)', 'pair: stopped'], tail(pair));
  assert.match(sup.stderr, new RegExp(` warn up: primary ${primary} did not stop within ${limits.upStopTimeoutMs} ms of SIGTERM \\(stopped or hung\\): killing it \\(SIGKILL\\)`), tail(pair));
  assert.doesNotMatch(sup.stderr, new RegExp(`secondary ${secondary} did not stop`), 'the secondary stopped by itself');
  await waitFor('both children to be gone', () => !pidAlive(primary) && !pidAlive(secondary), 5000);
  assert.deepEqual(pidsUsing(env.dir), [], 'no process of the pair is left');
});

test('colo up: the primary dies and the secondary dies while taking over: the dead primary\'s disk, with every acknowledged write, becomes the --drive image', async (t) => {
  const env = new TestEnv(t);
  const pair = await startProtectedPair(env);
  const { sup, port, image, first, primary: p1, secondary: s2, clients } = pair;
  const r = await RespClient.connect(port);
  clients.push(r);
  assert.equal(await r.command(['SET', 'before', '1']), 'OK');
  // A first failover: vm2 serves now, on its own copy of the disk in the state folder.
  process.kill(p1, 'SIGKILL');
  const again = await sup.line(new RegExp(`^pair: protected \\(primary pid ${s2}, secondary pid (\\d+)\\)$`), first.at + 1, 60000);
  const s3 = Number(again.m[1]);
  const r2 = await RespClient.connect(port);
  clients.push(r2);
  assert.equal(await r2.command(['SET', 'after', '2']), 'OK', 'acknowledged under COLO by vm2 and vm3');
  // vm2 dies, and vm3 cannot finish taking over: it is stopped before, and killed during it.
  process.kill(s3, 'SIGSTOP');
  process.kill(s2, 'SIGKILL');
  await waitFor(`colo up to start the takeover on ${s3}; ${tail(pair)}`, () => new RegExp(`primary ${s2} died \\(SIGKILL\\); secondary ${s3} takes over`).test(sup.stderr), 10000);
  process.kill(s3, 'SIGKILL');
  // Its QMP connection closes just before its exit is seen: the line names the death all the same.
  await sup.line(new RegExp(`^pair: failed \\(secondary ${s3} died \\(SIGKILL\\) while taking over\\)$`), again.at + 1, 15000);
  await sup.waitExit(15000);
  assert.equal(sup.exitCode, 1, tail(pair));
  assert.doesNotMatch(sup.stderr, /is gone with it/, 'the last primary\'s disk was kept');
  // The image now holds what vm2 wrote, also after the first failover.
  const vm = await env.startVm({ name: 'check', guest: guests.kv, args: ['--memory', '256M', '--drive', `file=${image}`, '--net', `listen=127.0.0.1:${port}`] });
  const c = await waitFor('the check VM to answer', async () => RespClient.connect(port, '127.0.0.1', 500).catch(() => undefined), 30000);
  clients.push(c);
  assert.equal(await c.command(['GET', 'before']), '1');
  assert.equal(await c.command(['GET', 'after']), '2', 'the write acknowledged after the first failover is on the --drive image');
  await vm.qmp.close();
});

test('colo up: a secondary that hangs while taking over is waited for, not killed: once it runs again it serves, with every write', async (t) => {
  const env = new TestEnv(t);
  const pair = await startProtectedPair(env);
  const { sup, port, first, primary: p1, secondary: s2, clients } = pair;
  const r = await RespClient.connect(port);
  clients.push(r);
  assert.equal(await r.command(['SET', 'k', 'v']), 'OK');
  process.kill(s2, 'SIGSTOP');
  // Whatever happens, the secondary must not stay stopped (the cleanup's SIGKILL works anyway).
  env.onCleanup(() => {
    if (pidAlive(s2)) process.kill(s2, 'SIGCONT');
  });
  process.kill(p1, 'SIGKILL');
  await waitFor(`colo up to start the takeover on ${s2}; ${tail(pair)}`, () => new RegExp(`primary ${p1} died \\(SIGKILL\\); secondary ${s2} takes over`).test(sup.stderr), 10000);
  // Longer than the failover timeout: the stall must not be taken for a failed takeover.
  await sleep(limits.upFailoverTimeoutMs + 2000);
  assert.ok(sup.alive, `colo up lives on; ${tail(pair)}`);
  assert.ok(pidAlive(s2), `the stalled secondary was not killed; ${tail(pair)}`);
  assert.ok(!sup.lines.some((l) => /^pair: failed/.test(l)), tail(pair));
  process.kill(s2, 'SIGCONT');
  await sup.line(new RegExp(`^pair: primary died \\(SIGKILL\\); secondary ${s2} took over on 127\\.0\\.0\\.1:${port}$`), first.at + 1, 10000);
  const c = await waitFor('the service to answer again', async () => RespClient.connect(port, '127.0.0.1', 500).catch(() => undefined), 10000);
  clients.push(c);
  assert.equal(await c.command(['GET', 'k']), 'v');
  await sup.line(new RegExp(`^pair: protected \\(primary pid ${s2}, secondary pid \\d+\\)$`), first.at + 1, 60000);
});

test('colo up: its stdout reader goes away (EPIPE): the pair runs on and still fails over; the state lines go to the log', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const args = [coloBin, 'up', guests.kv, '--net', `listen=127.0.0.1:${port}`, '--memory', '256M', '--checkpoint-delay', '200', '--state-dir', env.dir];
  const proc = spawn(process.execPath, args, { cwd: env.dir, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  proc.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<{ code: number | null; signal: string | null }>((r) => proc.once('exit', (code, signal) => r({ code, signal })));
  let alive = true;
  void exited.then(() => (alive = false));
  env.onCleanup(async () => {
    if (alive) {
      proc.kill('SIGTERM');
      await withTimeout(exited, 10000, 'colo up to exit').catch(() => proc.kill('SIGKILL'));
    }
    for (const pid of pidsUsing(env.dir)) if (pidAlive(pid)) process.kill(pid, 'SIGKILL');
  });
  // The reader takes the first line, then goes (as `colo up ... | head -1`).
  const firstLine = await withTimeout(new Promise<string>((r) => proc.stdout.once('data', (d: Buffer) => r(d.toString()))), 30000, 'the first line of colo up');
  assert.match(firstLine, /^pair: starting/);
  proc.stdout.destroy();
  const protectedLine = /up info up: pair: protected \(primary pid (\d+), secondary pid (\d+)\)/;
  const m = await waitFor('the pair to be protected (in the log)', () => {
    if (!alive) throw new Error(`colo up exited: ${stderr.slice(-3000)}`);
    return protectedLine.exec(stderr) ?? undefined;
  }, 90000);
  assert.match(stderr, /up warn up: stdout is gone/);
  const [p1, s1] = [Number(m[1]), Number(m[2])];
  const r = await RespClient.connect(port);
  assert.equal(await r.command(['SET', 'k', 'v']), 'OK');
  r.close();
  process.kill(p1, 'SIGKILL');
  await waitFor(`the takeover (in the log); stderr: ${stderr.slice(-2000)}`, () => new RegExp(`pair: primary died \\(SIGKILL\\); secondary ${s1} took over`).test(stderr), 15000);
  const c = await RespClient.connect(port);
  assert.equal(await c.command(['GET', 'k']), 'v');
  c.close();
  assert.ok(alive, 'colo up lives on');
  proc.kill('SIGTERM');
  const end = await withTimeout(exited, 15000, 'colo up to exit');
  assert.deepEqual(end, { code: 0, signal: null });
  assert.deepEqual(pidsUsing(env.dir), [], 'no process of the pair is left');
});

/** `colo up` on a 128 MiB drive of random data (the initial migration copies it all: it takes a while), once the migration started. */
async function duringInitialMigration(t: TestContext): Promise<{ env: TestEnv; sup: Supervisor; primary: number; secondary: number }> {
  const env = new TestEnv(t);
  const port = await freePort();
  const image = env.image('big.img', 128 * 1024 * 1024, (b) => crypto.randomFillSync(b));
  const args = [coloBin, 'up', guests.kv, '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`, '--memory', '256M', '--state-dir', env.dir];
  const sup = spawnSupervisor(env, args);
  const m = await waitFor('the initial migration to start', () => {
    if (!sup.alive) throw new Error(`colo up exited: ${sup.stderr.slice(-3000)}`);
    return /protecting: migrating primary (\d+) into secondary (\d+)/.exec(sup.stderr) ?? undefined;
  }, 60000, 5);
  // The secondary has the source's connection: data is on its way.
  await waitFor('the secondary to accept the migration', () => / info migration: incoming migration from /.test(sup.stderr), 10000, 5);
  await sleep(100);
  return { env, sup, primary: Number(m[1]), secondary: Number(m[2]) };
}

test('colo up: the primary dies during the initial migration: the pair fails, and says so (not a failed protection attempt)', async (t) => {
  const { env, sup, primary: p1 } = await duringInitialMigration(t);
  process.kill(p1, 'SIGKILL');
  await sup.waitExit(15000);
  const pairLines = sup.lines.slice(1);
  assert.ok(!pairLines.some((l) => /^pair: protected/.test(l)), `killed before the pair was protected (else the test proves nothing): ${sup.timeline()}`);
  assert.deepEqual(pairLines, [`pair: failed (primary ${p1} died (SIGKILL) while the pair was protecting)`, 'pair: stopped'], sup.stderr.slice(-3000));
  assert.equal(sup.exitCode, 1);
  assert.deepEqual(pidsUsing(env.dir), [], 'no process of the pair is left');
});

test('colo up: SIGTERM during the initial migration stops the pair without an error-level log line', async (t) => {
  const { env, sup } = await duringInitialMigration(t);
  sup.proc.kill('SIGTERM');
  await sup.waitExit(15000);
  const pairLines = sup.lines.slice(1);
  assert.deepEqual(pairLines, ['pair: stopping (SIGTERM)', 'pair: stopped'], `stopped before the pair was protected (else the test proves nothing): ${sup.timeline()}`);
  assert.equal(sup.exitCode, 0);
  const errors = sup.stderr.split('\n').filter((l) => / error /.test(l));
  assert.deepEqual(errors, [], 'stopping is expected: the migration it breaks off logs no error, on either child');
  assert.deepEqual(pidsUsing(env.dir), [], 'no process of the pair is left');
});

test("colo up: the primary's guest exits by itself (a client asks it to): the pair stops with the guest's exit status, no failover, no error", async (t) => {
  const env = new TestEnv(t);
  // Accepts one client, then exits with status 3 (both replicas do: the secondary runs the same input).
  const guest = exitOnConnectGuest(t, 3);
  const port = await freePort();
  const args = [coloBin, 'up', guest, '--net', `listen=127.0.0.1:${port}`, '--memory', '16M', '--checkpoint-delay', '200', '--state-dir', env.dir];
  const sup = spawnSupervisor(env, args);
  const first = await sup.line(/^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 60000);
  const client = net.connect(port, '127.0.0.1');
  client.on('error', () => undefined);
  env.onCleanup(() => {
    client.destroy();
  });
  await sup.waitExit(15000);
  const what = `colo up printed: ${sup.timeline()}; its stderr ends: ${sup.stderr.slice(-2000)}`;
  // The secondary's guest may be seen to exit first: said as such, not as a death.
  assert.deepEqual(sup.lines.slice(first.at + 1).filter((l) => !/^pair: the guest of secondary \d+ exited \(exit code 3\)/.test(l)), ['pair: stopping (the guest exited)', 'pair: stopped'], what);
  assert.equal(sup.exitCode, 3, `the guest's exit status; ${what}`);
  const errors = sup.stderr.split('\n').filter((l) => / error /.test(l));
  assert.deepEqual(errors, [], 'a guest that ends is no failure');
  assert.deepEqual(pidsUsing(env.dir), [], 'no process of the pair is left');
});

test('colo up: an initial migration longer than --protect-timeout that keeps moving is not cut off; one that stops moving (its secondary stopped) is a failed attempt', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  // All of it travels at the protection (random: nothing to skip), for longer than the timeout:
  // 1 GiB, as 384 MiB went over in 833 ms on a quiet CI machine (under 2 × the timeout).
  const image = env.image('big.img', 1024 * 1024 * 1024, (b) => crypto.randomFillSync(b));
  const timeoutMs = 500;
  // No heartbeat: the stopped secondary must stall the migration, not be fenced for it.
  const args = [coloBin, 'up', guests.kv, '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`, '--memory', '64M', '--state-dir', env.dir];
  args.push('--protect-timeout', String(timeoutMs), '--heartbeat-timeout', '0');
  const sup = new Supervisor(spawn(process.execPath, args, { cwd: env.dir, stdio: ['ignore', 'pipe', 'pipe'] }));
  env.onCleanup(async () => {
    for (const pid of pidsUsing(env.dir)) if (pidAlive(pid)) process.kill(pid, 'SIGKILL');
    if (sup.alive) {
      sup.proc.kill('SIGTERM');
      await sup.waitExit(10000).catch(() => sup.proc.kill('SIGKILL'));
    }
  });
  const what = (): string => `colo up printed: ${sup.timeline()}; its stderr ends: ${sup.stderr.slice(-2500)}`;
  const first = await sup.line(/^pair: (protected \(primary pid (\d+), secondary pid (\d+)\)|unprotected .*)$/, 0, 90000);
  assert.match(first.m[0], /^pair: protected/, `the long migration was not given up on; ${what()}`);
  // It did last longer than the timeout (else this proves nothing).
  const times = [...sup.stderr.matchAll(/^(\S+) up info up: protecting: migrating/gm)].map((m) => Date.parse(m[1]!));
  const loaded = /^(\S+) vm2 info migration: state loaded/m.exec(sup.stderr);
  assert.ok(times.length === 1 && loaded !== null, what());
  const tookMs = Date.parse(loaded[1]!) - times[0]!;
  t.diagnostic(`the initial migration took ${tookMs} ms (--protect-timeout ${timeoutMs})`);
  assert.ok(tookMs > 2 * timeoutMs, `the migration took ${tookMs} ms, not well above the timeout: the test proves nothing; ${what()}`);

  // The secondary dies; the next one is stopped once data flows to it: the migration stalls.
  const [p1, s1] = [Number(first.m[2]), Number(first.m[3])];
  process.kill(s1, 'SIGKILL');
  const migrations = (): RegExpMatchArray[] => [...sup.stderr.matchAll(/protecting: migrating primary \d+ into secondary (\d+)/g)];
  await waitFor(`the re-protection's migration to start; ${what()}`, () => migrations().length >= 2, 60000, 5);
  const s2 = Number(migrations()[1]![1]);
  await waitFor('the new secondary to accept the migration', () => (sup.stderr.match(/ info migration: incoming migration from /g) ?? []).length >= 2, 10000, 5);
  process.kill(s2, 'SIGSTOP');
  env.onCleanup(() => {
    if (pidAlive(s2)) process.kill(s2, 'SIGKILL');
  });
  // (Attempt 2: the first protection, ended at once by the kill, counts as failed.)
  const failed = await sup.line(/^pair: unprotected \(attempt \d+ to protect it failed: (.*)\)$/, first.at + 1, 30000);
  assert.match(failed.m[1]!, new RegExp(`the migration into vm\\d+ moved nothing for ${timeoutMs} ms`), what());
  await waitFor(`the stalled secondary ${s2} to be killed`, () => !pidAlive(s2), 5000);
  assert.ok(pidAlive(p1), 'the primary serves on');
  const r = await RespClient.connect(port);
  assert.equal(await r.command(['SET', 'k', 'v']), 'OK', 'the primary answers');
  r.close();
});

test('colo up: the reader of the stderr it shares with its children goes away (EPIPE): the supervisor and the children live on, and a failover still happens', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const args = [coloBin, 'up', guests.kv, '--net', `listen=127.0.0.1:${port}`, '--memory', '64M', '--checkpoint-delay', '200', '--state-dir', env.dir];
  // Its stderr, which the children inherit, is a pipe whose reader is killed (as `colo up ... 2>&1 | tee log` once tee is gone).
  const reader = spawn('cat', [], { stdio: ['pipe', 'ignore', 'ignore'] });
  const proc = spawn(process.execPath, args, { cwd: env.dir, stdio: ['ignore', 'pipe', reader.stdin] });
  reader.stdin.destroy();
  let out = '';
  proc.stdout.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<{ code: number | null; signal: string | null }>((r) => proc.once('exit', (code, signal) => r({ code, signal })));
  let alive = true;
  void exited.then(() => (alive = false));
  env.onCleanup(async () => {
    reader.kill('SIGKILL');
    if (alive) {
      proc.kill('SIGTERM');
      await withTimeout(exited, 10000, 'colo up to exit').catch(() => proc.kill('SIGKILL'));
    }
    for (const pid of pidsUsing(env.dir)) if (pidAlive(pid)) process.kill(pid, 'SIGKILL');
  });
  const line = (re: RegExp, ms: number): Promise<RegExpExecArray> =>
    waitFor(`colo up to print ${re} (printed: ${out})`, () => {
      const m = re.exec(out);
      if (m !== null) return m;
      if (!alive) throw new Error(`colo up exited; it printed: ${out}`);
      return undefined;
    }, ms);
  const p = await line(/^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/m, 90000);
  reader.kill('SIGKILL');
  await new Promise((r) => reader.once('exit', r));
  const r = await RespClient.connect(port);
  assert.equal(await r.command(['SET', 'k', 'v']), 'OK');
  r.close();
  // Its death makes every process of the pair log: colo up, and the secondary that takes over.
  const [p1, s1] = [Number(p[1]), Number(p[2])];
  out = '';
  process.kill(p1, 'SIGKILL');
  await line(new RegExp(`^pair: primary died \\(SIGKILL\\); secondary ${s1} took over`, 'm'), 15000);
  const c = await RespClient.connect(port);
  assert.equal(await c.command(['GET', 'k']), 'v', 'the secondary took over and serves');
  c.close();
  await line(/^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/m, 90000);
  assert.ok(alive && pidAlive(s1), 'colo up and the serving child live on');
  proc.kill('SIGTERM');
  assert.deepEqual(await withTimeout(exited, 15000, 'colo up to exit'), { code: 0, signal: null });
});

/**
 * A guest that turns every 10 ms (u32 turns at 96) and traps when its clock moved more than
 * `gapMs` between two of its turns: a node whose process was stopped that long crashes, one
 * that ran on does not. Under COLO only the stopped secondary takes that trap: its
 * checkpoints hold the primary's last turn.
 *
 * `clock` 'monotonic' (guest time) stops while the VM is paused, so only a stopped process
 * traps; 'realtime' (the host's wall clock) also moves while the VM is paused: a primary
 * paused longer than `gapMs` (the initial migration's switch-over, which waits for the
 * secondary's load, under load) traps as well.
 */
function stallTrapGuest(t: TestContext, gapMs: number, gapMsMax?: number, clock: 'monotonic' | 'realtime' = 'monotonic'): string {
  const clockId = clock === 'monotonic' ? 1 : 0;
  // With gapMsMax: a gap longer than that is no trap (a node stopped for longer runs on).
  const below = gapMsMax === undefined ? '(i32.const 1)' : `(i64.le_u (i64.sub (i64.load (i32.const 64)) (i64.load (i32.const 200))) (i64.const ${BigInt(gapMsMax) * 1000000n}))`;
  return watGuest(t, `${gapMsMax === undefined ? 'stall-trap' : 'stall-band-trap'}-${clock}`, `(module
    (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
    (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 1)
    (func (export "_start")
      ;; a clock subscription at 1024: 10 ms relative on the monotonic clock
      (i32.store8 (i32.const 1032) (i32.const 0))
      (i32.store (i32.const 1040) (i32.const 1))
      (i64.store (i32.const 1048) (i64.const 10000000))
      (loop $turn
        (drop (call $clock (i32.const ${clockId}) (i64.const 0) (i32.const 64)))
        (if (i32.and (i32.and (i64.ne (i64.load (i32.const 200)) (i64.const 0))
              (i64.gt_u (i64.sub (i64.load (i32.const 64)) (i64.load (i32.const 200))) (i64.const ${BigInt(gapMs) * 1000000n}))) ${below})
          (then unreachable))
        (i64.store (i32.const 200) (i64.load (i32.const 64)))
        (i32.store (i32.const 96) (i32.add (i32.load (i32.const 96)) (i32.const 1)))
        (drop (call $poll (i32.const 1024) (i32.const 2048) (i32.const 1) (i32.const 2100)))
        (br $turn))))`);
}

test('colo up: a guest crash only the secondary takes is replaced by the primary\'s checkpoint: the secondary is not killed nor replaced, and takes over later', async (t) => {
  const env = new TestEnv(t);
  const guest = stallTrapGuest(t, 1500);
  const port = await freePort();
  // No heartbeat fencing of the stopped secondary; checkpoints far apart (the crash is not
  // covered by a periodic one that happens to come while it is stopped).
  const args = [coloBin, 'up', guest, '--net', `listen=127.0.0.1:${port}`, '--memory', '64M', '--checkpoint-delay', '5000', '--heartbeat-timeout', '60000', '--state-dir', env.dir];
  const sup = spawnSupervisor(env, args);
  const first = await sup.line(/^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 90000);
  const [primary, secondary] = [Number(first.m[1]), Number(first.m[2])];
  const log = (): string => `colo up printed: ${sup.timeline()}; its stderr ends: ${sup.stderr.slice(-3000)}`;
  env.onCleanup(() => {
    if (pidAlive(secondary)) process.kill(secondary, 'SIGCONT');
  });
  // The premise: a primary whose VM is paused longer than the guest allows (as the switch-over
  // into COLO can be under load: it waits for the secondary's load) does not trap, only a
  // stopped process does. On the wall clock it did, now and then, and the pair failed over.
  const pq = await qmpOf(primary, sup);
  env.onCleanup(() => pq.close());
  await pq.execute('stop');
  await sleep(2500);
  // A periodic checkpoint may have resumed it (as QEMU's does), or hold it for a moment now.
  await waitFor(`the primary to resume; ${log()}`, () => pq.execute('cont').then(() => true, (err: unknown) => {
    if (/COLO checkpoint in progress/.test(String(err))) return undefined;
    throw err;
  }), 5000);
  await sleep(500);
  assert.doesNotMatch(sup.stderr, /guest crashed/, `a paused VM is no stall of its guest; ${log()}`);
  // Its process stopped for longer than the guest allows between turns: the SVM traps once it runs again.
  for (let i = 0; i < 3 && !/the SVM's guest crashed/.test(sup.stderr); i++) {
    process.kill(secondary, 'SIGSTOP');
    await sleep(2500);
    process.kill(secondary, 'SIGCONT');
    await waitFor(`the secondary's guest to crash; ${log()}`, () => /the SVM's guest crashed/.test(sup.stderr) || undefined, 3000).catch(() => undefined);
  }
  assert.match(sup.stderr, /the SVM's guest crashed \(unreachable\)/, log());
  // Time for a kill and its failover, had there been one.
  await sleep(3000);
  assert.ok(pidAlive(secondary), `the secondary was not killed; ${log()}`);
  assert.deepEqual(sup.lines.slice(first.at + 1), [], `no failover nor re-protection; ${log()}`);
  // The secondary holds the primary's state again: it takes over.
  process.kill(primary, 'SIGKILL');
  await sup.line(new RegExp(`^pair: primary died \\(SIGKILL\\); secondary ${secondary} took over on 127\\.0\\.0\\.1:${port}$`), first.at + 1, 15000);
  await sup.line(new RegExp(`^pair: protected \\(primary pid ${secondary}, secondary pid \\d+\\)$`), first.at + 1, 60000);
  assert.doesNotMatch(sup.stderr, / error /, log());
});

test('colo up --heartbeat-timeout 0: a secondary whose guest stays crashed (no checkpoint comes) is still killed after upSecondaryCrashedMs, and replaced', async (t) => {
  const env = new TestEnv(t);
  // Traps after a stop of 1.5 to 4 s: the secondary stopped 2.5 s crashes; the primary, stopped
  // for longer (so that no resync checkpoint comes), runs on.
  const guest = stallTrapGuest(t, 1500, 4000);
  const port = await freePort();
  const args = [coloBin, 'up', guest, '--net', `listen=127.0.0.1:${port}`, '--memory', '64M', '--checkpoint-delay', '20000', '--heartbeat-timeout', '0', '--state-dir', env.dir];
  const sup = spawnSupervisor(env, args);
  const first = await sup.line(/^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 90000);
  const [primary, secondary] = [Number(first.m[1]), Number(first.m[2])];
  const log = (): string => `colo up printed: ${sup.timeline()}; its stderr ends: ${sup.stderr.slice(-3000)}`;
  env.onCleanup(() => {
    for (const pid of [primary, secondary]) if (pidAlive(pid)) process.kill(pid, 'SIGCONT');
  });
  process.kill(secondary, 'SIGSTOP');
  await sleep(2500);
  process.kill(primary, 'SIGSTOP');
  process.kill(secondary, 'SIGCONT');
  await waitFor(`the secondary's guest to crash; ${log()}`, () => /reports that its guest crashed \(unreachable\); left running/.test(sup.stderr) || undefined, 5000);
  const crashedAt = performance.now();
  // No heartbeat, no checkpoint (the primary is stopped): only the crash watch can fence it.
  await waitFor(`the crashed secondary ${secondary} to be killed; ${log()}`, () => !pidAlive(secondary), limits.upSecondaryCrashedMs + 5000);
  const tookMs = performance.now() - crashedAt;
  assert.ok(tookMs >= limits.upSecondaryCrashedMs - 500, `killed after ${tookMs} ms, not left to the resync for upSecondaryCrashedMs; ${log()}`);
  assert.match(sup.stderr, /its guest has stayed crashed for \d+ ms, not replaced by a checkpoint\): killing it/, log());
  process.kill(primary, 'SIGCONT');
  await sup.line(new RegExp(`^pair: secondary died \\(killed: guest crashed: its guest has stayed crashed for \\d+ ms, not replaced by a checkpoint\\); primary ${primary} continues unprotected$`), first.at + 1, 15000);
  await sup.line(new RegExp(`^pair: protected \\(primary pid ${primary}, secondary pid \\d+\\)$`), first.at + 1, 60000);
  assert.ok(pidAlive(primary), log());
});

test('colo up: a primary whose guest crashes as the pair enters COLO, before colo up saw the protection complete: the secondary takes over (it is not killed as a failed attempt)', async (t) => {
  const env = new TestEnv(t);
  // The wall clock: the primary is stopped soon after the switch-over, maybe while its VM is
  // still paused for it, and must trap all the same (a trap during that pause is this case too).
  const guest = stallTrapGuest(t, 1500, 4000, 'realtime');
  const port = await freePort();
  // A drive of random data: the initial migration lasts long enough to stop colo up during it.
  const image = env.image('big.img', 128 * 1024 * 1024, (b) => crypto.randomFillSync(b));
  const args = [coloBin, 'up', guest, '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`, '--memory', '64M', '--checkpoint-delay', '20000', '--heartbeat-timeout', '0', '--state-dir', env.dir];
  const sup = spawnSupervisor(env, args);
  const log = (): string => `colo up printed: ${sup.timeline()}; its stderr ends: ${sup.stderr.slice(-3000)}`;
  const m = await waitFor(`the initial migration to start; ${log()}`, () => /protecting: migrating primary (\d+) into secondary (\d+)/.exec(sup.stderr) ?? undefined, 60000, 5);
  const [primary, secondary] = [Number(m[1]), Number(m[2])];
  // Data is on its way; colo up is stopped before it can see the primary in status colo.
  await waitFor('the secondary to accept the migration', () => / info migration: incoming migration from /.test(sup.stderr), 10000, 5);
  sup.proc.kill('SIGSTOP');
  env.onCleanup(() => {
    for (const pid of [primary, secondary]) if (pidAlive(pid)) process.kill(pid, 'SIGCONT');
    if (sup.alive) sup.proc.kill('SIGCONT');
  });
  await waitFor('the pair to enter COLO', () => /entering COLO as the secondary/.test(sup.stderr) || undefined, 60000).catch((err: unknown) => {
    throw new Error(`${String(err)}; ${log()}`);
  });
  await sleep(300);
  // The primary, stopped 2.5 s, traps as it runs again: it leaves COLO (status completed).
  process.kill(primary, 'SIGSTOP');
  await sleep(2500);
  process.kill(primary, 'SIGCONT');
  await waitFor(`the primary's guest to crash; ${log()}`, () => /COLO ended on the primary: its guest crashed/.test(sup.stderr) || undefined, 5000);
  sup.proc.kill('SIGCONT');
  await sup.line(new RegExp(`^pair: primary died \\(killed: guest crashed: unreachable\\); secondary ${secondary} took over on 127\\.0\\.0\\.1:${port}$`), 0, 20000).catch((err: unknown) => {
    throw new Error(`${String(err)}; ${log()}`);
  });
  assert.ok(!pidAlive(primary), 'the crashed primary was fenced');
  assert.ok(!sup.lines.some((l) => /^pair: unprotected \(attempt \d+ to protect it failed/.test(l)), `not a failed protection attempt; ${log()}`);
  await sup.line(new RegExp(`^pair: protected \\(primary pid ${secondary}, secondary pid \\d+\\)$`), 0, 90000);
});

test('colo up: the primary\'s guest crashes while it has no partner in COLO (a new secondary is being made): the service is lost, colo up says so and exits 1, instead of trying to protect a crashed VM for ever', async (t) => {
  const env = new TestEnv(t);
  // Accepts one client, reads a byte, traps.
  const guest = watGuest(t, 'up-trap-on-read', `(module
    (import "wasi_snapshot_preview1" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "sock_recv" (func $recv (param i32 i32 i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 1)
    (func (export "_start")
      (if (call $accept (i32.const 3) (i32.const 0) (i32.const 0)) (then (unreachable)))
      (i32.store (i32.const 16) (i32.const 1024))
      (i32.store (i32.const 20) (i32.const 256))
      (drop (call $recv (i32.load (i32.const 0)) (i32.const 16) (i32.const 1) (i32.const 0) (i32.const 32) (i32.const 36)))
      unreachable))`);
  const port = await freePort();
  const args = [coloBin, 'up', guest, '--net', `listen=127.0.0.1:${port}`, '--memory', '16M', '--checkpoint-delay', '60000', '--state-dir', env.dir];
  const sup = spawnSupervisor(env, args);
  const first = await sup.line(/^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 60000);
  const [primary, secondary] = [Number(first.m[1]), Number(first.m[2])];
  const log = (): string => `colo up printed: ${sup.timeline()}; its stderr ends: ${sup.stderr.slice(-3000)}`;
  process.kill(secondary, 'SIGKILL');
  const died = await sup.line(new RegExp(`^pair: secondary died \\(SIGKILL\\); primary ${primary} continues unprotected$`), first.at + 1, 15000);
  // The trap reaches the primary alone: the new secondary is still starting or migrating.
  const client = net.connect(port, '127.0.0.1');
  client.on('error', () => undefined);
  env.onCleanup(() => {
    client.destroy();
  });
  client.write('c');
  const failed = await sup.line(new RegExp(`^pair: failed \\(the guest of primary ${primary} crashed \\((.*)\\) and no partner can take over\\)$`), died.at + 1, 30000).catch((err: unknown) => {
    throw new Error(`${(err as Error).message}; ${log()}`);
  });
  assert.match(failed.m[1]!, /unreachable/, log());
  await sup.waitExit(15000);
  assert.equal(sup.exitCode, 1, `the service was lost; ${log()}`);
  assert.ok(!sup.lines.slice(died.at + 1).some((l) => /^pair: protected/.test(l)), `the crashed primary was never reported protected; ${log()}`);
  assert.deepEqual(pidsUsing(env.dir), [], 'no process of the pair is left');
});
