/**
 * `colo up` (real processes) when the guest ends by itself (proc_exit), on both nodes or on
 * one: the pair stops with the guest's status, or, when the runs diverged, the primary goes on
 * and is protected again. Not a crash of a process: a guest's exit is no failure.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { TestEnv, coloBin, freePort, pidAlive, pidsUsing, waitFor, withTimeout, sleep } from '../framework/harness.js';
import { limits } from '../../src/core/limits.js';
import { spawnSupervisor, type Supervisor } from '../framework/up.js';
import { watGuest } from '../framework/machine.js';

/**
 * Accepts one client, reads what it sends, computes `iterations` loop turns (stopped time does
 * not count), answers "bye\n" and exits with status 7.
 */
function computeByeGuest(t: TestContext, iterations: number): string {
  return watGuest(t, 'up-compute-bye', `(module
    (import "wasi_snapshot_preview1" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "sock_recv" (func $recv (param i32 i32 i32 i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "sock_send" (func $send (param i32 i32 i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
    (memory (export "memory") 1)
    (data (i32.const 512) "bye\\n")
    (func (export "_start") (local $i i64)
      (if (call $accept (i32.const 3) (i32.const 0) (i32.const 0)) (then (unreachable)))
      (i32.store (i32.const 16) (i32.const 1024))
      (i32.store (i32.const 20) (i32.const 256))
      (drop (call $recv (i32.load (i32.const 0)) (i32.const 16) (i32.const 1) (i32.const 0) (i32.const 32) (i32.const 36)))
      (loop $compute
        (local.set $i (i64.add (local.get $i) (i64.const 1)))
        (br_if $compute (i64.lt_u (local.get $i) (i64.const ${iterations}))))
      (i32.store (i32.const 48) (i32.const 512))
      (i32.store (i32.const 52) (i32.const 4))
      (drop (call $send (i32.load (i32.const 0)) (i32.const 48) (i32.const 1) (i32.const 0) (i32.const 56)))
      (call $exit (i32.const 7))))`);
}

/**
 * Accepts a client, reads, sleeps 1 s, and exits (status 7) if the realtime clock moved more
 * than 2.5 s meanwhile (its node was stopped that long), else sleeps on for good: stopping one
 * node makes the two runs diverge.
 */
function exitIfLateGuest(t: TestContext): string {
  return watGuest(t, 'up-exit-if-late', `(module
    (import "wasi_snapshot_preview1" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "sock_recv" (func $recv (param i32 i32 i32 i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
    (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
    (memory (export "memory") 1)
    (func $sleep
      (i32.store (i32.const 272) (i32.const 1))
      (i64.store (i32.const 280) (i64.const 1000000000))
      (if (call $poll (i32.const 256) (i32.const 320) (i32.const 1) (i32.const 360)) (then (unreachable))))
    (func (export "_start")
      (if (call $accept (i32.const 3) (i32.const 0) (i32.const 0)) (then (unreachable)))
      (i32.store (i32.const 16) (i32.const 1024))
      (i32.store (i32.const 20) (i32.const 256))
      (drop (call $recv (i32.load (i32.const 0)) (i32.const 16) (i32.const 1) (i32.const 0) (i32.const 32) (i32.const 36)))
      (drop (call $clock (i32.const 0) (i64.const 1) (i32.const 128)))
      (call $sleep)
      (drop (call $clock (i32.const 0) (i64.const 1) (i32.const 136)))
      (if (i64.gt_u (i64.sub (i64.load (i32.const 136)) (i64.load (i32.const 128))) (i64.const 2500000000)) (then (call $exit (i32.const 7))))
      (loop $forever (call $sleep) (br $forever))))`);
}

/** Connect, send `x`, and collect what comes back until the connection ends. */
function ask(env: TestEnv, port: number): Promise<string> {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    env.onCleanup(() => {
      s.destroy();
    });
    let got = '';
    s.on('connect', () => s.write('x'));
    s.on('data', (d) => (got += d.toString()));
    s.on('error', () => resolve(got));
    s.on('close', () => resolve(got));
  });
}

function what(sup: Supervisor): string {
  return `colo up printed: ${sup.timeline()}; its stderr ends: ${sup.stderr.slice(-3000)}`;
}

async function upPair(t: TestContext, guest: string): Promise<{ env: TestEnv; sup: Supervisor; port: number; first: { at: number }; primary: number; secondary: number }> {
  const env = new TestEnv(t);
  const port = await freePort();
  // No checkpoint by time, and a heartbeat that a stopped node does not trip: the test stops nodes.
  const args = [coloBin, 'up', guest, '--net', `listen=127.0.0.1:${port}`, '--memory', '16M', '--checkpoint-delay', '60000', '--heartbeat-timeout', '60000', '--state-dir', env.dir];
  const sup = spawnSupervisor(env, args);
  const first = await sup.line(/^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 60000);
  return { env, sup, port, first, primary: Number(first.m[1]), secondary: Number(first.m[2]) };
}

test("colo up: the secondary's guest exits before the primary's (the primary lags, here stopped): not a death; the pair stops with the guest's status once the primary's exits, starting no new secondary", async (t) => {
  const { env, sup, port, first, primary, secondary } = await upPair(t, computeByeGuest(t, 1_000_000_000));
  env.onCleanup(() => {
    if (pidAlive(primary)) process.kill(primary, 'SIGCONT');
  });
  const asked = ask(env, port);
  await sleep(300);
  process.kill(primary, 'SIGSTOP');
  try {
    await waitFor(`the secondary's guest to exit; ${what(sup)}`, () => !pidAlive(secondary), 20000);
    // What colo up makes of it while the primary cannot answer.
    await sleep(500);
  } finally {
    process.kill(primary, 'SIGCONT');
  }
  assert.equal(await withTimeout(asked, 25000, 'the answer'), 'bye\n', `the client got the answer; ${what(sup)}`);
  await sup.waitExit(30000);
  assert.deepEqual(sup.lines.slice(first.at + 1).filter((l) => !/^pair: the guest of secondary \d+ exited/.test(l)), ['pair: stopping (the guest exited)', 'pair: stopped'], what(sup));
  assert.ok(sup.lines.some((l) => new RegExp(`^pair: the guest of secondary ${secondary} exited \\(exit code 7\\)`).test(l)), `the secondary's guest exit is said as such; ${what(sup)}`);
  assert.equal(sup.exitCode, 7, `the guest's exit status; ${what(sup)}`);
  assert.doesNotMatch(sup.stderr, / (warn|error) /, 'a guest that ends is no failure');
  assert.deepEqual(pidsUsing(env.dir), [], 'no process of the pair is left');
});

test("colo up: only the secondary's guest exits (the runs diverged: here the secondary's clock jumped): the primary goes on after limits.coloSvmExitWaitMs, and is protected again with a new secondary", async (t) => {
  const guest = exitIfLateGuest(t);
  const { env, sup, port, first, primary, secondary } = await upPair(t, guest);
  env.onCleanup(() => {
    if (pidAlive(secondary)) process.kill(secondary, 'SIGCONT');
  });
  void ask(env, port);
  await sleep(300);
  process.kill(secondary, 'SIGSTOP');
  await sleep(3000);
  process.kill(secondary, 'SIGCONT');
  await waitFor(`the secondary's guest to exit; ${what(sup)}`, () => !pidAlive(secondary), 20000);
  const exitedAt = performance.now();
  const again = await sup.line(new RegExp(`^pair: protected \\(primary pid ${primary}, secondary pid (\\d+)\\)$`), first.at + 1, limits.coloSvmExitWaitMs + 60000);
  t.diagnostic(`unprotected for ${Math.round(performance.now() - exitedAt)} ms (limits.coloSvmExitWaitMs ${limits.coloSvmExitWaitMs})`);
  // No failed attempt (the protection lasted less than limits.upProtectStableMs): a divergence is the guests'.
  const lines = sup.lines.slice(first.at + 1, again.at);
  assert.deepEqual(
    lines,
    [
      `pair: the guest of secondary ${secondary} exited (exit code 7); waiting up to ${limits.coloSvmExitWaitMs / 1000} s for the guest of primary ${primary} to exit too`,
      `pair: the guests diverged (the secondary's exited, the primary's runs on); primary ${primary} continues unprotected`,
      'pair: re-protecting',
    ],
    what(sup),
  );
  assert.ok(pidAlive(primary) && sup.alive, `the primary serves on under colo up; ${what(sup)}`);
  assert.doesNotMatch(sup.stderr, / error /, 'a divergence is no error');
});

test("colo up: only the primary's guest exits (the runs diverged: here the primary's clock jumped): the pair stops with the guest's status, as QEMU's on a guest shutdown of the primary; the secondary does not take over", async (t) => {
  const { env, sup, port, first, primary, secondary } = await upPair(t, exitIfLateGuest(t));
  env.onCleanup(() => {
    if (pidAlive(primary)) process.kill(primary, 'SIGCONT');
  });
  void ask(env, port);
  await sleep(300);
  process.kill(primary, 'SIGSTOP');
  await sleep(3000);
  process.kill(primary, 'SIGCONT');
  await sup.waitExit(30000);
  assert.deepEqual(sup.lines.slice(first.at + 1), ['pair: stopping (the guest exited)', 'pair: stopped'], what(sup));
  assert.equal(sup.exitCode, 7, `the guest's exit status; ${what(sup)}`);
  assert.ok(!pidAlive(secondary), 'the secondary was stopped');
  assert.doesNotMatch(sup.stderr, / error /, 'a guest that ends is no failure');
  assert.deepEqual(pidsUsing(env.dir), [], 'no process of the pair is left');
});

test("colo up: a guest that exits at once, before colo up connected to the primary (a short batch job): the pair stops with the guest's status, not 'pair: failed' with status 1", async (t) => {
  const env = new TestEnv(t);
  const guest = watGuest(t, 'up-exit-at-once', `(module
    (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
    (memory (export "memory") 1)
    (func (export "_start") (call $exit (i32.const 5))))`);
  const port = await freePort();
  const sup = spawnSupervisor(env, [coloBin, 'up', guest, '--net', `listen=127.0.0.1:${port}`, '--memory', '16M', '--state-dir', env.dir]);
  await sup.waitExit(30000);
  assert.deepEqual(sup.lines.slice(1), ['pair: stopping (the guest exited)', 'pair: stopped'], what(sup));
  assert.equal(sup.exitCode, 5, `the guest's exit status; ${what(sup)}`);
  assert.doesNotMatch(sup.stderr, / error /, 'a guest that ends is no failure');
  assert.deepEqual(pidsUsing(env.dir), [], 'no process of the pair is left');
});
