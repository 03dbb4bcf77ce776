/**
 * `colo up` supervision alone (cli/up-core.ts): start, protect, failover on either side,
 * re-protection, a failed protection attempt, a lost service, and stopping on a signal.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PairCore, type PairAction, type PairConfig, type PairEvent } from '../../src/cli/up-core.js';
import { limits } from '../../src/core/limits.js';

/** Actions as short strings, logs left out. */
function run(core: PairCore, e: PairEvent): string[] {
  return core.step(e).filter((a) => a.type !== 'log').map(show);
}

function show(a: PairAction): string {
  switch (a.type) {
    case 'print':
      return a.line;
    case 'spawn':
      return `spawn ${a.node} ${a.role}`;
    case 'protect':
      return `protect ${a.primary}->${a.secondary}`;
    case 'takeover':
    case 'continueAlone':
    case 'discardDisk':
      return `${a.type} ${a.node}`;
    case 'kill':
      return `kill ${a.node} ${a.signal}`;
    case 'setTimer':
      return `timer ${a.name} ${a.ms}`;
    case 'exit':
      return `exit ${a.code} primary ${a.primary}`;
    case 'log':
      return 'log';
  }
}

/** The configuration of most tests: two protection attempts, 100 ms apart, no stable period. */
function pairCore(cfg: Partial<PairConfig> = {}): PairCore {
  return new PairCore({ address: '127.0.0.1:6379', retryDelayMs: 100, protectAttemptsMax: 2, stopTimeoutMs: 500, stableMs: 0, ...cfg });
}

/**
 * A pair started with `cfg`: nodes 1 and 2 (pids 101, 102) spawned and ready (`readyFirst`
 * first), the protection of 1 by 2 asked for.
 */
function protecting(cfg: Partial<PairConfig> = {}, readyFirst: 1 | 2 = 1): PairCore {
  const c = pairCore(cfg);
  assert.deepEqual(run(c, { type: 'start' }), ['pair: starting', 'spawn 1 primary', 'spawn 2 secondary']);
  run(c, { type: 'spawned', node: 1, pid: 101 });
  run(c, { type: 'spawned', node: 2, pid: 102 });
  assert.deepEqual(run(c, { type: 'ready', node: readyFirst }), []);
  assert.deepEqual(run(c, { type: 'ready', node: readyFirst === 1 ? 2 : 1 }), ['protect 1->2']);
  assert.equal(c.phase, 'protecting');
  return c;
}

function protectedPair(): PairCore {
  const c = protecting({}, 2);
  assert.deepEqual(run(c, { type: 'protected' }), ['pair: protected (primary pid 101, secondary pid 102)']);
  assert.equal(c.phase, 'protected');
  return c;
}

/** Secondary `s` (pid 100 + s) spawned and ready: the core asks for the protection of `primary` by it. */
function secondaryReady(c: PairCore, primary: number, s: number): void {
  run(c, { type: 'spawned', node: s, pid: 100 + s });
  assert.deepEqual(run(c, { type: 'ready', node: s }), [`protect ${primary}->${s}`]);
}

/** Secondary `s` spawned and ready, and the protection of `primary` by it done: the pair says it is protected. */
function protectedBy(c: PairCore, primary: number, s: number): void {
  secondaryReady(c, primary, s);
  assert.deepEqual(run(c, { type: 'protected' }), [`pair: protected (primary pid ${100 + primary}, secondary pid ${100 + s})`]);
}

/** A protected pair whose secondary died: primary 1 re-protected by node 3, asked for. */
function reprotectingBy3(): PairCore {
  const c = protectedPair();
  assert.deepEqual(run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' }), ['continueAlone 1', 'discardDisk 2']);
  assert.deepEqual(run(c, { type: 'continued', node: 1 }).slice(-1), ['spawn 3 secondary']);
  secondaryReady(c, 1, 3);
  return c;
}

/** What a protection attempt saw (`e`) before it failed is forgotten: the next protection starts clean. */
function assertFailedProtectionForgets(e: PairEvent): void {
  const f = reprotectingBy3();
  run(f, e);
  assert.deepEqual(run(f, { type: 'protectFailed', error: 'cancelled' }), ['pair: unprotected (attempt 1 to protect it failed: cancelled)', 'kill 3 SIGKILL']);
  run(f, { type: 'exited', node: 3, code: null, signal: 'SIGKILL' });
  run(f, { type: 'timer', name: 'retry' });
  protectedBy(f, 1, 4);
  assert.equal(f.phase, 'protected');
}

test('colo up core: the primary dies: the secondary takes over, a new secondary protects it again', () => {
  const c = protectedPair();
  assert.deepEqual(run(c, { type: 'exited', node: 1, code: null, signal: 'SIGKILL' }), ['takeover 2']);
  assert.equal(c.phase, 'failover');
  assert.deepEqual(run(c, { type: 'tookOver', node: 2 }), [
    'discardDisk 1',
    'pair: primary died (SIGKILL); secondary 102 took over on 127.0.0.1:6379',
    'pair: re-protecting',
    'spawn 3 secondary',
  ]);
  protectedBy(c, 2, 3);
});

test('colo up core: the secondary dies: the primary continues, then is protected again', () => {
  const c = protectedPair();
  assert.deepEqual(run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' }), ['continueAlone 1', 'discardDisk 2']);
  assert.deepEqual(run(c, { type: 'continued', node: 1 }), [
    'pair: secondary died (SIGKILL); primary 101 continues unprotected',
    'pair: re-protecting',
    'spawn 3 secondary',
  ]);
  protectedBy(c, 1, 3);
});

test('colo up core: a failed protection kills the secondary and retries; after too many it says so and retries slowly until protected', () => {
  const c = reprotectingBy3();
  assert.deepEqual(run(c, { type: 'protectFailed', error: 'boom' }), ['pair: unprotected (attempt 1 to protect it failed: boom)', 'kill 3 SIGKILL']);
  assert.deepEqual(run(c, { type: 'exited', node: 3, code: null, signal: 'SIGKILL' }), ['discardDisk 3', 'pair: unprotected (primary 101; next protection attempt in 0.1 s)', 'timer retry 100']);
  assert.deepEqual(run(c, { type: 'timer', name: 'retry' }), ['pair: re-protecting', 'spawn 4 secondary']);
  run(c, { type: 'spawned', node: 4, pid: 104 });
  // This one dies before it is ready: the second failure, and the last allowed.
  assert.deepEqual(run(c, { type: 'exited', node: 4, code: 1, signal: null }), [
    'pair: unprotected (secondary 104 exited before it was ready: exit code 1)',
    'discardDisk 4',
    'pair: unprotected (primary 101; gave up after 2 failed attempts to protect it; trying again every 60 s)',
    'timer retry 60000',
  ]);
  assert.equal(c.phase, 'unprotected');
  // Later attempts do not say again that it gave up; one that succeeds protects the pair again.
  assert.deepEqual(run(c, { type: 'timer', name: 'retry' }), ['pair: re-protecting', 'spawn 5 secondary']);
  secondaryReady(c, 1, 5);
  assert.deepEqual(run(c, { type: 'protectFailed', error: 'still full' }), ['pair: unprotected (attempt 3 to protect it failed: still full)', 'kill 5 SIGKILL']);
  assert.deepEqual(run(c, { type: 'exited', node: 5, code: null, signal: 'SIGKILL' }), ['discardDisk 5', 'pair: unprotected (primary 101; next protection attempt in 60 s)', 'timer retry 60000']);
  assert.deepEqual(run(c, { type: 'timer', name: 'retry' }), ['pair: re-protecting', 'spawn 6 secondary']);
  protectedBy(c, 1, 6);
  assert.equal(c.phase, 'protected');
  // The next failure starts a new count.
  assert.deepEqual(run(c, { type: 'exited', node: 6, code: null, signal: 'SIGKILL' }), ['continueAlone 1', 'discardDisk 6']);
  assert.deepEqual(run(c, { type: 'continued', node: 1 }), ['pair: secondary died (SIGKILL); primary 101 continues unprotected', 'pair: re-protecting', 'spawn 7 secondary']);
  // A signal stops both.
  assert.deepEqual(run(c, { type: 'signal', signal: 'SIGTERM' }), ['pair: stopping (SIGTERM)', 'kill 1 SIGTERM', 'kill 7 SIGTERM', 'timer stopTimeout 500']);
  assert.deepEqual(run(c, { type: 'exited', node: 7, code: 0, signal: null }), []);
  assert.deepEqual(run(c, { type: 'exited', node: 1, code: 0, signal: null }), ['pair: stopped', 'exit 0 primary 1']);
});

test('colo up core: the primary dies while unprotected: the service is lost, exit 1', () => {
  const c = protectedPair();
  run(c, { type: 'exited', node: 1, code: null, signal: 'SIGKILL' });
  run(c, { type: 'tookOver', node: 2 });
  run(c, { type: 'spawned', node: 3, pid: 103 });
  const out = run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' });
  assert.match(out[0]!, /^pair: failed \(primary 102 died \(SIGKILL\) while the pair was reprotecting\)$/);
  assert.deepEqual(out.slice(1), ['kill 3 SIGTERM', 'timer stopTimeout 500']);
  assert.deepEqual(run(c, { type: 'timer', name: 'stopTimeout' }), ['kill 3 SIGKILL']);
  assert.deepEqual(run(c, { type: 'exited', node: 3, code: null, signal: 'SIGKILL' }), ['pair: stopped', 'exit 1 primary 2']);
});

test('colo up core: a signal stops both children; a death while stopping is no failover', () => {
  const c = protectedPair();
  assert.deepEqual(run(c, { type: 'signal', signal: 'SIGINT' }), ['pair: stopping (SIGINT)', 'kill 1 SIGTERM', 'kill 2 SIGTERM', 'timer stopTimeout 500']);
  // A second Ctrl-C does not wait for the stop timeout: what is left is killed for good.
  assert.deepEqual(run(c, { type: 'signal', signal: 'SIGINT' }), ['kill 1 SIGKILL', 'kill 2 SIGKILL']);
  assert.deepEqual(run(c, { type: 'exited', node: 1, code: 0, signal: null }), []);
  // So does the stop timeout, for a child that ignores SIGTERM, and says so (no silent SIGKILL).
  const killed = c.step({ type: 'timer', name: 'stopTimeout' });
  assert.deepEqual(killed.filter((a) => a.type !== 'log').map(show), ['kill 2 SIGKILL']);
  assert.ok(killed.some((a) => a.type === 'log' && a.level === 'warn' && /^secondary 102 did not stop within 500 ms of SIGTERM \(stopped or hung\): killing it \(SIGKILL\)$/.test(a.msg)), JSON.stringify(killed));
  assert.deepEqual(run(c, { type: 'exited', node: 2, code: 0, signal: null }), ['pair: stopped', 'exit 0 primary 1']);
});

test('colo up core: a hung primary is killed (fenced) and the secondary takes over, as after a crash', () => {
  const c = protectedPair();
  const out = c.step({ type: 'unresponsive', node: 1, ms: 1000 });
  assert.deepEqual(out.filter((a) => a.type !== 'log').map(show), ['kill 1 SIGKILL']);
  assert.ok(out.some((a) => a.type === 'log' && a.level === 'warn' && /primary 101 has not answered QMP for 1000 ms: killing it/.test(a.msg)), JSON.stringify(out));
  // Reported once: a second report of the same stall does nothing more.
  assert.deepEqual(run(c, { type: 'unresponsive', node: 1, ms: 1000 }), []);
  assert.equal(c.phase, 'protected', 'the failover starts with its death, not before');
  assert.deepEqual(run(c, { type: 'exited', node: 1, code: null, signal: 'SIGKILL' }), ['takeover 2']);
  assert.deepEqual(run(c, { type: 'tookOver', node: 2 }), [
    'discardDisk 1',
    'pair: primary died (killed: hung, no answer to QMP for 1000 ms); secondary 102 took over on 127.0.0.1:6379',
    'pair: re-protecting',
    'spawn 3 secondary',
  ]);
});

test('colo up core: both nodes stalled at once: only the first reported is killed, the other is the service now', () => {
  // A host-wide pause: both heartbeats time out together. The primary is fenced; the secondary,
  // its only partner, is left running to take over.
  const c = protectedPair();
  assert.deepEqual(run(c, { type: 'unresponsive', node: 1, ms: 1000 }), ['kill 1 SIGKILL']);
  const out = c.step({ type: 'unresponsive', node: 2, ms: 1000 });
  assert.deepEqual(out.filter((a) => a.type !== 'log').map(show), [], 'the secondary is not killed too');
  assert.ok(out.some((a) => a.type === 'log' && /left running: no partner can take over/.test(a.msg)), JSON.stringify(out));
  assert.deepEqual(run(c, { type: 'exited', node: 1, code: null, signal: 'SIGKILL' }), ['takeover 2']);
  // The other order, and a secondary condemned for leaving COLO: the primary is spared.
  const d = protectedPair();
  assert.deepEqual(run(d, { type: 'unresponsive', node: 2, ms: 1000 }), ['kill 2 SIGKILL']);
  assert.deepEqual(run(d, { type: 'unresponsive', node: 1, ms: 1000 }), []);
  const e = protectedPair();
  assert.deepEqual(run(e, { type: 'coloExit', node: 2, mode: 'secondary', reason: 'error' }), ['kill 2 SIGKILL']);
  assert.deepEqual(run(e, { type: 'unresponsive', node: 1, ms: 1000 }), []);
  assert.deepEqual(run(e, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' }), ['continueAlone 1', 'discardDisk 2']);
});

test('colo up core: a hung secondary is killed and the primary continues', () => {
  const c = protectedPair();
  assert.deepEqual(run(c, { type: 'unresponsive', node: 2, ms: 1500 }), ['kill 2 SIGKILL']);
  assert.deepEqual(run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' }), ['continueAlone 1', 'discardDisk 2']);
  assert.deepEqual(run(c, { type: 'continued', node: 1 })[0], 'pair: secondary died (killed: hung, no answer to QMP for 1500 ms); primary 101 continues unprotected');
});

test('colo up core: a secondary in COLO whose guest crashed is left to the primary\'s checkpoint (said once at info); one that stays crashed is killed like a hung one, and its death is the usual failover', () => {
  const c = protectedPair();
  // A trap only the SVM took: the primary's resync checkpoint replaces its state.
  const first = c.step({ type: 'crashed', node: 2, message: 'unreachable', at: 0 });
  assert.deepEqual(first.filter((a) => a.type !== 'log'), [], JSON.stringify(first));
  assert.ok(first.some((a) => a.type === 'log' && a.level === 'info' && /secondary 102 reports that its guest crashed \(unreachable\); left running: the primary's checkpoint replaces its state/.test(a.msg)), JSON.stringify(first));
  const again = c.step({ type: 'crashed', node: 2, message: 'unreachable', at: 0 });
  assert.deepEqual(again.map((a) => (a.type === 'log' ? a.level : show(a))), ['debug'], 'a streak is said once');
  assert.equal(c.phase, 'protected');
  // Still crashed after limits.upSecondaryCrashedMs (the process lives on and would count as
  // protection it does not give): fenced.
  const out = c.step({ type: 'crashed', node: 2, message: 'unreachable', at: 0, stuck: true });
  assert.deepEqual(out.filter((a) => a.type !== 'log').map(show), ['kill 2 SIGKILL']);
  assert.ok(out.some((a) => a.type === 'log' && a.level === 'warn' && /secondary 102 reports that its guest crashed \(unreachable\): killing it/.test(a.msg)), JSON.stringify(out));
  assert.deepEqual(run(c, { type: 'crashed', node: 2, message: 'unreachable', at: 0 }), [], 'reported once');
  assert.deepEqual(run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' }), ['continueAlone 1', 'discardDisk 2']);
  assert.deepEqual(run(c, { type: 'continued', node: 1 }), [
    'pair: secondary died (killed: guest crashed: unreachable); primary 101 continues unprotected',
    'pair: re-protecting',
    'spawn 3 secondary',
  ]);
  // The primary's guest crashes while it has no partner in COLO (a new secondary is starting):
  // nothing holds the guest's state but its crashed self, the service is lost. Before, it was
  // left running, and a new secondary tried to protect it every retry period, for ever.
  const alone = c.step({ type: 'crashed', node: 1, message: 'out of bounds', at: 0 });
  assert.deepEqual(alone.filter((a) => a.type !== 'log').map(show), [
    'pair: failed (the guest of primary 101 crashed (out of bounds) and no partner can take over)',
    'kill 1 SIGTERM',
    'kill 3 SIGTERM',
    'timer stopTimeout 500',
  ]);
  assert.ok(alone.some((a) => a.type === 'log' && a.level === 'error' && /the service is lost/.test(a.msg)), JSON.stringify(alone));
  assert.equal(c.phase, 'stopping');
});

test('colo up core: a primary whose guest crashed is killed, and its COLO_EXIT that follows leaves the secondary to take over', () => {
  const c = protectedPair();
  assert.deepEqual(run(c, { type: 'crashed', node: 1, message: 'unreachable', at: 0 }), ['kill 1 SIGKILL']);
  // The primary leaves COLO after its GUEST_PANICKED (colo/core.ts leave): not a primary going on alone.
  assert.deepEqual(run(c, { type: 'coloExit', node: 1, mode: 'primary', reason: 'error' }), [], 'the secondary is not killed');
  assert.deepEqual(run(c, { type: 'exited', node: 1, code: null, signal: 'SIGKILL' }), ['takeover 2']);
});

test('colo up core: a hung node with no partner is reported, not killed; answering again is reported too', () => {
  const c = protectedPair();
  run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' });
  run(c, { type: 'continued', node: 1 });
  assert.equal(c.phase, 'reprotecting');
  const out = c.step({ type: 'unresponsive', node: 1, ms: 1000 });
  assert.deepEqual(out.filter((a) => a.type !== 'log'), [], 'the only node serving is not killed');
  assert.ok(out.some((a) => a.type === 'log' && a.level === 'warn' && /left running: no partner/.test(a.msg)), JSON.stringify(out));
  const back = c.step({ type: 'responsive', node: 1, ms: 2300 });
  assert.ok(back.some((a) => a.type === 'log' && a.level === 'info' && /primary 101 answers again after 2300 ms/.test(a.msg)), JSON.stringify(back));
  // A dead node's late report changes nothing.
  run(c, { type: 'spawned', node: 3, pid: 103 });
  run(c, { type: 'exited', node: 3, code: 1, signal: null });
  assert.deepEqual(c.step({ type: 'unresponsive', node: 3, ms: 1000 }), []);
});

test('colo up core: a primary that leaves COLO by itself gets its out-of-date secondary killed and a new one', () => {
  const c = protectedPair();
  assert.deepEqual(run(c, { type: 'coloExit', node: 1, mode: 'primary', reason: 'error' }), [
    'pair: primary 101 left COLO (reason error); it continues unprotected',
    'kill 2 SIGKILL',
    'discardDisk 2',
    'pair: re-protecting',
    'spawn 3 secondary',
  ]);
  assert.equal(c.secondary?.id, 3, 'the out-of-date secondary can no longer be told to take over');
  // Its death is that of a replaced node: no failover.
  assert.deepEqual(run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' }), []);
  protectedBy(c, 1, 3);
  // The primary dies now: the new secondary, which has everything, takes over.
  assert.deepEqual(run(c, { type: 'exited', node: 1, code: null, signal: 'SIGKILL' }), ['takeover 3']);
});

test('colo up core: a secondary that leaves COLO by itself is killed, and its death is a failover to the primary', () => {
  const c = protectedPair();
  assert.deepEqual(run(c, { type: 'coloExit', node: 2, mode: 'secondary', reason: 'error' }), ['kill 2 SIGKILL']);
  assert.equal(c.phase, 'protected', 'until it is gone');
  // Told again (its event, then the catch-up after a lost QMP connection): once is enough.
  assert.deepEqual(c.step({ type: 'coloExit', node: 2, mode: 'secondary', reason: 'error' }), []);
  assert.deepEqual(run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' }), ['continueAlone 1', 'discardDisk 2']);
  assert.deepEqual(run(c, { type: 'continued', node: 1 }), [
    'pair: secondary died (killed: left COLO (reason error)); primary 101 continues unprotected',
    'pair: re-protecting',
    'spawn 3 secondary',
  ]);
});

test('colo up core: the COLO_EXIT of a failover the supervisor asked for changes nothing more', () => {
  const c = protectedPair();
  run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' });
  assert.equal(c.phase, 'failover');
  assert.deepEqual(run(c, { type: 'coloExit', node: 1, mode: 'primary', reason: 'request' }), []);
  const c2 = protectedPair();
  run(c2, { type: 'exited', node: 1, code: null, signal: 'SIGKILL' });
  assert.deepEqual(run(c2, { type: 'coloExit', node: 2, mode: 'secondary', reason: 'request' }), []);
  assert.deepEqual(run(c2, { type: 'tookOver', node: 2 }).slice(0, 2), ['discardDisk 1', 'pair: primary died (SIGKILL); secondary 102 took over on 127.0.0.1:6379']);
});

test('colo up core: a secondary that is taking over is never killed for a slow heartbeat', () => {
  const c = protectedPair();
  run(c, { type: 'exited', node: 1, code: null, signal: 'SIGKILL' });
  assert.equal(c.phase, 'failover');
  const out = c.step({ type: 'unresponsive', node: 2, ms: 1000 });
  assert.deepEqual(out.filter((a) => a.type !== 'log'), [], 'the only copy of the service is not killed');
  assert.ok(out.some((a) => a.type === 'log' && a.level === 'warn' && /no partner/.test(a.msg)), JSON.stringify(out));
  assert.deepEqual(run(c, { type: 'tookOver', node: 2 }).slice(0, 2), ['discardDisk 1', 'pair: primary died (SIGKILL); secondary 102 took over on 127.0.0.1:6379']);
});

test('colo up core: a protection that ends before it is stable counts as a failed attempt: the next waits its turn, and after too many, the slow retries', () => {
  const c = protecting({ stableMs: 30000 });
  assert.deepEqual(run(c, { type: 'protected' }), ['timer stable 30000', 'pair: protected (primary pid 101, secondary pid 102)']);
  // The secondary dies at once: the primary goes on, the next attempt waits (100 ms × 1).
  assert.deepEqual(run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' }), ['continueAlone 1', 'discardDisk 2']);
  assert.deepEqual(run(c, { type: 'continued', node: 1 }), [
    'pair: secondary died (SIGKILL); primary 101 continues unprotected',
    'pair: unprotected (primary 101; the protection lasted less than 30 s: attempt 1 to protect it failed; next protection attempt in 0.1 s)',
    'timer retry 100',
  ]);
  // The first protection's stable timer, late, changes nothing now.
  assert.deepEqual(run(c, { type: 'timer', name: 'stable', gen: 1 }), []);
  assert.deepEqual(run(c, { type: 'timer', name: 'retry' }), ['pair: re-protecting', 'spawn 3 secondary']);
  secondaryReady(c, 1, 3);
  assert.deepEqual(run(c, { type: 'protected' }), ['timer stable 30000', 'pair: protected (primary pid 101, secondary pid 103)']);
  // The first protection's stable timer, if it fires only now, is not this protection's.
  assert.deepEqual(run(c, { type: 'timer', name: 'stable', gen: 1 }), []);
  // Again at once: the second failure in a row gives up, and retries every retryLaterMs.
  run(c, { type: 'exited', node: 3, code: null, signal: 'SIGKILL' });
  const out = run(c, { type: 'continued', node: 1 });
  assert.deepEqual(out.slice(1, 2), ['pair: unprotected (primary 101; the protection lasted less than 30 s: attempt 2 to protect it failed; gave up after 2 failed attempts to protect it; trying again every 60 s)']);
  assert.equal(out[2], 'timer retry 60000');
  // A protection that lasts: its stable timer clears the count, and a later failover re-protects at once.
  run(c, { type: 'timer', name: 'retry' });
  secondaryReady(c, 1, 4);
  run(c, { type: 'protected' });
  assert.deepEqual(run(c, { type: 'timer', name: 'stable', gen: 3 }), []);
  run(c, { type: 'exited', node: 4, code: null, signal: 'SIGKILL' });
  assert.deepEqual(run(c, { type: 'continued', node: 1 }), ['pair: secondary died (SIGKILL); primary 101 continues unprotected', 'pair: re-protecting', 'spawn 5 secondary']);
});

test('colo up core: the primary dies and its secondary dies while taking over: the dead primary is the last primary, and its disk was kept for the drive', () => {
  // After a first failover the primary's disk is one of the supervisor's copies. It holds every
  // acknowledged write: it may go only once the secondary has taken over.
  const c = protectedPair();
  run(c, { type: 'exited', node: 1, code: null, signal: 'SIGKILL' });
  run(c, { type: 'tookOver', node: 2 });
  secondaryReady(c, 2, 3);
  run(c, { type: 'protected' });
  const died = run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' });
  assert.deepEqual(died, ['takeover 3'], 'the dead primary keeps its disk while its secondary takes over');
  assert.deepEqual(run(c, { type: 'exited', node: 3, code: null, signal: 'SIGKILL' }), [
    'pair: failed (secondary 103 died (SIGKILL) while taking over)',
    'pair: stopped',
    'exit 1 primary 2',
  ]);
  // The same when the takeover fails without a death.
  const d = protectedPair();
  run(d, { type: 'exited', node: 1, code: null, signal: 'SIGKILL' });
  const failed = run(d, { type: 'failoverFailed', node: 2, error: 'boom' });
  assert.ok(!failed.includes('discardDisk 1'), JSON.stringify(failed));
});

/**
 * The primary leaves COLO by itself (its link to the secondary broke, a checkpoint failed, the
 * secondary refused the state) right after each protection, for a cause that persists. Each
 * time, the delay before the next secondary is started: 0 when the core spawns it at once.
 */
function delaysAfterPrimaryColoExits(c: PairCore, cycles: number): { delays: number[]; lines: string[] } {
  const delays: number[] = [];
  const lines: string[] = [];
  for (let i = 0; i < cycles; i++) {
    const p = c.primary!.id;
    assert.equal(c.phase, 'protected', `cycle ${i}: protected`);
    const out = run(c, { type: 'coloExit', node: p, mode: 'primary', reason: 'error' });
    lines.push(...out.filter((l) => l.startsWith('pair: ')));
    let spawned = out.find((l) => / secondary$/.test(l) && l.startsWith('spawn '));
    if (spawned === undefined) {
      const timer = out.find((l) => l.startsWith('timer retry '));
      assert.ok(timer !== undefined, `cycle ${i}: a new secondary at once or a retry timer: ${JSON.stringify(out)}`);
      delays.push(Number(timer.split(' ')[2]));
      const later = run(c, { type: 'timer', name: 'retry' });
      lines.push(...later.filter((l) => l.startsWith('pair: ')));
      spawned = later.find((l) => l.startsWith('spawn '));
      assert.ok(spawned !== undefined, `cycle ${i}: the retry starts a secondary: ${JSON.stringify(later)}`);
    } else {
      delays.push(0);
    }
    const s = Number(spawned.split(' ')[1]);
    secondaryReady(c, p, s);
    run(c, { type: 'protected' });
    // The killed, out-of-date secondary's exit comes late: that of a replaced node.
    assert.deepEqual(run(c, { type: 'exited', node: s - 1, code: null, signal: 'SIGKILL' }), []);
  }
  return { delays, lines };
}

test('colo up core: a primary that leaves COLO by itself right after every protection is re-protected with the growing pause, not at once each time', () => {
  const c = protecting({ protectAttemptsMax: 3, retryLaterMs: 5000, stableMs: 30000 });
  run(c, { type: 'protected' });
  const { delays, lines } = delaysAfterPrimaryColoExits(c, 5);
  // 100 ms × 1, × 2, then attemptsMax (3) failures in a row: every retryLaterMs.
  assert.deepEqual(delays, [100, 200, 5000, 5000, 5000], `the pause before each new secondary; printed: ${JSON.stringify(lines)}`);
  // While it waits, the pair says so, and when the next attempt comes.
  assert.deepEqual(lines.slice(0, 2), [
    'pair: primary 101 left COLO (reason error); it continues unprotected',
    'pair: unprotected (primary 101; the protection lasted less than 30 s: attempt 1 to protect it failed; next protection attempt in 0.1 s)',
  ]);
  assert.ok(lines.includes('pair: unprotected (primary 101; the protection lasted less than 30 s: attempt 3 to protect it failed; gave up after 3 failed attempts to protect it; trying again every 5 s)'), JSON.stringify(lines));
  assert.ok(lines.includes('pair: unprotected (primary 101; the protection lasted less than 30 s: attempt 4 to protect it failed; next protection attempt in 5 s)'), JSON.stringify(lines));
  // A protection that lasts clears the count: the next COLO exit re-protects at once, the one
  // right after it waits the first pause again.
  const gen = 6; // the protections so far: the first and five re-protections
  assert.deepEqual(run(c, { type: 'timer', name: 'stable', gen }), []);
  assert.deepEqual(delaysAfterPrimaryColoExits(c, 2).delays, [0, 100]);
});

test('colo up core: a secondary that dies right after it entered COLO, before the supervisor saw the protection complete: the primary is told to go on alone, and it is a failed attempt', () => {
  // protect() saw the primary in status colo and the secondary's MIGRATION colo event (already
  // in its QMP log), but the secondary's exit was handled first, while the pair was protecting.
  const c = protecting({ protectAttemptsMax: 3, stableMs: 30000 });
  assert.deepEqual(run(c, { type: 'exited', node: 2, code: null, signal: 'SIGSEGV' }), ['discardDisk 2']);
  const out = run(c, { type: 'protected' });
  assert.ok(!out.some((l) => l.startsWith('pair: protected')), `a dead secondary protects nothing: ${JSON.stringify(out)}`);
  // The primary is in COLO with no partner: at once x-colo-lost-heartbeat, as after a death while protected.
  assert.ok(out.includes('continueAlone 1'), JSON.stringify(out));
  assert.equal(c.phase, 'failover');
  assert.deepEqual(run(c, { type: 'continued', node: 1 }), [
    'pair: secondary died (SIGSEGV); primary 101 continues unprotected',
    'pair: unprotected (primary 101; the protection lasted less than 30 s: attempt 1 to protect it failed; next protection attempt in 0.1 s)',
    'timer retry 100',
  ]);
  assert.deepEqual(run(c, { type: 'timer', name: 'retry' }), ['pair: re-protecting', 'spawn 3 secondary']);
  // Its primary dies now: no secondary in COLO, the service is lost (not a takeover by the dead one).
  assert.match(run(c, { type: 'exited', node: 1, code: null, signal: 'SIGKILL' })[0]!, /^pair: failed \(primary 101 died \(SIGKILL\) while the pair was reprotecting\)$/);
});

test('colo up core: a secondary that dies at every start, before it is ready, is retried with the same growing pause as any failed attempt', () => {
  const c = protectedPair(); // retryDelayMs 100, protectAttemptsMax 2, retryLaterMs 60000 (default)
  run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' });
  assert.deepEqual(run(c, { type: 'continued', node: 1 }).slice(-1), ['spawn 3 secondary'], 'the first re-protection after a failover comes at once');
  const delays: number[] = [];
  for (let s = 3; s <= 6; s++) {
    run(c, { type: 'spawned', node: s, pid: 100 + s });
    const out = run(c, { type: 'exited', node: s, code: 1, signal: null });
    const timer = out.find((l) => l.startsWith('timer retry '));
    assert.ok(timer !== undefined && !out.some((l) => l.startsWith('spawn ')), `node ${s}: no new secondary before a pause: ${JSON.stringify(out)}`);
    delays.push(Number(timer.split(' ')[2]));
    assert.deepEqual(run(c, { type: 'timer', name: 'retry' }), ['pair: re-protecting', `spawn ${s + 1} secondary`]);
  }
  assert.deepEqual(delays, [100, 60000, 60000, 60000]);
});

test('colo up core: the guest of the primary exits by itself: the pair stops with its exit status, whichever child is seen to go first, and nobody takes over', () => {
  // Its exit seen first: the secondary, its guest about to exit too, is stopped, not told to take over.
  const c = protectedPair();
  // The primary is not sent SIGTERM: its process ends by itself, and a signal meeting its end would lose the status.
  assert.deepEqual(run(c, { type: 'guestShutdown', node: 1 }), ['pair: stopping (the guest exited)', 'kill 2 SIGTERM', 'timer stopTimeout 500']);
  assert.deepEqual(run(c, { type: 'exited', node: 2, code: 0, signal: null }), []);
  assert.deepEqual(run(c, { type: 'exited', node: 1, code: 3, signal: null }), ['pair: stopped', 'exit 3 primary 1']);

  // The secondary's guest exited first (it runs the same input): its end is no death; the
  // primary is not told to go on alone, but waits for its own guest's exit (colo/core.ts).
  const d = protectedPair();
  assert.deepEqual(run(d, { type: 'guestShutdown', node: 2 }), [], "a secondary's guest alone does not stop the pair");
  assert.deepEqual(run(d, { type: 'exited', node: 2, code: 3, signal: null }), [
    `pair: the guest of secondary 102 exited (exit code 3); waiting up to ${limits.coloSvmExitWaitMs / 1000} s for the guest of primary 101 to exit too`,
    `timer svmExit ${limits.upSvmGuestExitWaitMs}`,
    'discardDisk 2',
  ]);
  assert.deepEqual(run(d, { type: 'guestShutdown', node: 1 }), ['pair: stopping (the guest exited)', 'timer stopTimeout 500']);
  assert.deepEqual(run(d, { type: 'timer', name: 'svmExit', gen: 1 }), [], 'the wait ends with the stop');
  assert.deepEqual(run(d, { type: 'exited', node: 1, code: 3, signal: null }), ['pair: stopped', 'exit 3 primary 1']);
});

test("colo up core: a primary whose guest exited but whose process does not end within the stop timeout is killed: the pair exits with the status its SHUTDOWN said, not 0", () => {
  const c = protectedPair();
  assert.deepEqual(run(c, { type: 'guestShutdown', node: 1, code: 3 }), ['pair: stopping (the guest exited)', 'kill 2 SIGTERM', 'timer stopTimeout 500']);
  assert.deepEqual(run(c, { type: 'exited', node: 2, code: 0, signal: null }), []);
  assert.deepEqual(run(c, { type: 'timer', name: 'stopTimeout' }), ['kill 1 SIGKILL']);
  const acts = c.step({ type: 'exited', node: 1, code: null, signal: 'SIGKILL' });
  assert.deepEqual(acts.filter((a) => a.type !== 'log').map(show), ['pair: stopped', 'exit 3 primary 1']);
  assert.ok(acts.some((a) => a.type === 'log' && a.level === 'warn' && /ended by SIGKILL/.test(a.msg)), 'the kill is said');

  // A SHUTDOWN without the status (not ours): unknown, so no success is claimed.
  const d = protectedPair();
  run(d, { type: 'guestShutdown', node: 1 });
  run(d, { type: 'exited', node: 2, code: 0, signal: null });
  run(d, { type: 'timer', name: 'stopTimeout' });
  assert.deepEqual(run(d, { type: 'exited', node: 1, code: null, signal: 'SIGKILL' }), ['pair: stopped', 'exit 1 primary 1']);

  // Its own exit status wins over what the event said.
  const e = protectedPair();
  run(e, { type: 'guestShutdown', node: 1, code: 3 });
  run(e, { type: 'exited', node: 2, code: 0, signal: null });
  assert.deepEqual(run(e, { type: 'exited', node: 1, code: 4, signal: null }), ['pair: stopped', 'exit 4 primary 1']);
});

test("colo up core: only the secondary's guest exits (the runs diverged): the primary, leaving COLO after its wait, is protected again; a primary that says nothing is taken as after a death", () => {
  const c = protectedPair();
  run(c, { type: 'guestShutdown', node: 2 });
  run(c, { type: 'exited', node: 2, code: 3, signal: null });
  assert.deepEqual(run(c, { type: 'coloExit', node: 1, mode: 'primary', reason: 'error' }), [
    "pair: the guests diverged (the secondary's exited, the primary's runs on); primary 101 continues unprotected",
    'pair: re-protecting',
    'spawn 3 secondary',
  ]);
  assert.deepEqual(run(c, { type: 'timer', name: 'svmExit', gen: 1 }), [], 'the wait of an ended protection does nothing');

  // Its COLO_EXIT never heard: after upSvmGuestExitWaitMs, the failover of a dead secondary.
  const d = protectedPair();
  run(d, { type: 'guestShutdown', node: 2 });
  run(d, { type: 'exited', node: 2, code: 3, signal: null });
  assert.deepEqual(run(d, { type: 'timer', name: 'svmExit', gen: 1 }), ['continueAlone 1']);
  assert.deepEqual(run(d, { type: 'continued', node: 1 }), ['pair: secondary died (exit code 3); primary 101 continues unprotected', 'pair: re-protecting', 'spawn 3 secondary']);
});

test("colo up core: a divergence (only the secondary's guest exited) before the protection was stable is no failed attempt: protected again at once, the failures not counted", () => {
  const c = protecting({ stableMs: 30000 }, 2);
  assert.deepEqual(run(c, { type: 'protected' }), ['timer stable 30000', 'pair: protected (primary pid 101, secondary pid 102)']);
  run(c, { type: 'guestShutdown', node: 2 });
  run(c, { type: 'exited', node: 2, code: 3, signal: null });
  assert.deepEqual(run(c, { type: 'coloExit', node: 1, mode: 'primary', reason: 'error' }), [
    "pair: the guests diverged (the secondary's exited, the primary's runs on); primary 101 continues unprotected",
    'pair: re-protecting',
    'spawn 3 secondary',
  ]);
  // A failure later counts as the first: the next attempt comes after the first pause.
  secondaryReady(c, 1, 3);
  assert.deepEqual(run(c, { type: 'protectFailed', error: 'boom' }), ['pair: unprotected (attempt 1 to protect it failed: boom)', 'kill 3 SIGKILL']);
});

test('colo up core: both children die, the secondary first: the line says the pair was failing over to the primary (not "was failover")', () => {
  const c = protectedPair();
  run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' });
  const out = run(c, { type: 'exited', node: 1, code: null, signal: 'SIGKILL' });
  assert.equal(out[0], 'pair: failed (primary 101 died (SIGKILL) while the pair was failing over to it)');
  assert.deepEqual(out.slice(1), ['pair: stopped', 'exit 1 primary 1']);
});

test('adopting the children of a supervisor that died: a protected pair is supervised as it is; a lone primary is protected again, with ids the folder never had', () => {
  const c = pairCore({ stateDir: '/s' });
  assert.deepEqual(run(c, { type: 'adopt', primary: { id: 4, pid: 404 }, secondary: { id: 5, pid: 505 }, nextId: 7 }), ['pair: adopted (state in /s): protected (primary pid 404, secondary pid 505)']);
  assert.equal(c.phase, 'protected');
  assert.deepEqual(run(c, { type: 'adopt', primary: { id: 1, pid: 1 }, secondary: null, nextId: 1 }), [], 'once');
  // The adopted primary dies (its exit is polled: no code, no signal): the usual failover.
  assert.deepEqual(run(c, { type: 'exited', node: 4, code: null, signal: null }), ['takeover 5']);
  assert.deepEqual(run(c, { type: 'tookOver', node: 5 }), ['discardDisk 4', 'pair: primary died (exit status unknown); secondary 505 took over on 127.0.0.1:6379', 'pair: re-protecting', 'spawn 7 secondary']);

  const lone = pairCore({ stateDir: '/s' });
  assert.deepEqual(run(lone, { type: 'adopt', primary: { id: 2, pid: 202 }, secondary: null, nextId: 3 }), ['pair: adopted (state in /s): primary 202 runs unprotected', 'pair: re-protecting', 'spawn 3 secondary']);
  run(lone, { type: 'spawned', node: 3, pid: 303 });
  assert.deepEqual(run(lone, { type: 'ready', node: 3 }), ['protect 2->3'], 'the adopted primary is ready');
  assert.deepEqual(run(lone, { type: 'protected' }), ['pair: protected (primary pid 202, secondary pid 303)']);
});

test('colo up core: a pair that fails over and is re-protected 60 times keeps only its living nodes and the dead ones it may still need', () => {
  const c = protectedPair();
  let primary = 1;
  let secondary = 2;
  let next = 3;
  /** Nodes the core still knows of, among every id it ever gave. */
  const known = (): number[] => Array.from({ length: next }, (_, i) => i).filter((id) => c.node(id) !== undefined);
  const reprotect = (): void => {
    const s = next++;
    secondaryReady(c, primary, s);
    run(c, { type: 'protected' });
    assert.equal(c.phase, 'protected');
    secondary = s;
  };
  for (let cycle = 0; cycle < 60; cycle++) {
    switch (cycle % 4) {
      case 0: // the primary dies: its disk stays until the takeover is done, so it is kept until then
        run(c, { type: 'exited', node: primary, code: null, signal: 'SIGKILL' });
        assert.ok(c.node(primary) !== undefined, 'the dead primary is known until its secondary took over');
        run(c, { type: 'tookOver', node: secondary });
        primary = secondary;
        break;
      case 1: // the secondary dies
        run(c, { type: 'exited', node: secondary, code: null, signal: 'SIGKILL' });
        run(c, { type: 'continued', node: primary });
        break;
      case 2: { // the primary leaves COLO by itself: its secondary is killed (and exits later)
        run(c, { type: 'coloExit', node: primary, mode: 'primary', reason: 'error' });
        const late = next; // the re-protection's secondary is spawned before the old one exits
        run(c, { type: 'exited', node: secondary, code: null, signal: 'SIGKILL' });
        assert.equal(c.node(late)?.role, 'secondary');
        break;
      }
      case 3: { // a protection attempt fails, and its secondary is killed
        run(c, { type: 'exited', node: secondary, code: null, signal: 'SIGKILL' });
        run(c, { type: 'continued', node: primary });
        const s = next++;
        secondaryReady(c, primary, s);
        assert.deepEqual(run(c, { type: 'protectFailed', error: 'boom' }), ['pair: unprotected (attempt 1 to protect it failed: boom)', `kill ${s} SIGKILL`]);
        run(c, { type: 'exited', node: s, code: null, signal: 'SIGKILL' });
        assert.deepEqual(run(c, { type: 'timer', name: 'retry' }), ['pair: re-protecting', `spawn ${next} secondary`]);
        break;
      }
    }
    reprotect();
    assert.deepEqual(known(), [primary, secondary].sort((a, b) => a - b), `after cycle ${cycle + 1}, only the primary and the secondary are known`);
  }
  assert.equal(next - 1, 2 + 60 + 15, `the pair went through a node per cycle, and one more per failed attempt`);
  // Stopping still works: both exit, the last primary's disk is the one kept.
  run(c, { type: 'signal', signal: 'SIGTERM' });
  run(c, { type: 'exited', node: secondary, code: 0, signal: null });
  assert.deepEqual(run(c, { type: 'exited', node: primary, code: 0, signal: null }), ['pair: stopped', `exit 0 primary ${primary}`]);
});

test('colo up core: late news of an attempt that ended changes nothing: a protection after its failure, a retry timer while a secondary boots', () => {
  const c = protectedPair();
  run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' });
  run(c, { type: 'continued', node: 1 });
  run(c, { type: 'spawned', node: 3, pid: 103 });
  // A retry timer left from earlier fires while the new secondary boots: no second secondary.
  assert.deepEqual(run(c, { type: 'timer', name: 'retry' }), []);
  assert.equal(c.phase, 'reprotecting');
  assert.deepEqual(run(c, { type: 'ready', node: 3 }), ['protect 1->3']);
  assert.deepEqual(run(c, { type: 'protectFailed', error: 'boom' }), ['pair: unprotected (attempt 1 to protect it failed: boom)', 'kill 3 SIGKILL']);
  // The migration's status colo, seen after it was declared failed: the secondary is being killed.
  assert.deepEqual(run(c, { type: 'protected' }), []);
  assert.equal(c.phase, 'unprotected');
  assert.deepEqual(run(c, { type: 'exited', node: 3, code: null, signal: 'SIGKILL' }), ['discardDisk 3', 'pair: unprotected (primary 101; next protection attempt in 0.1 s)', 'timer retry 100']);
  assert.deepEqual(run(c, { type: 'timer', name: 'retry' }), ['pair: re-protecting', 'spawn 4 secondary']);
});

test('colo up core: a COLO_EXIT that comes while the protection completes is acted on once the pair is protected: the out-of-date secondary is replaced', () => {
  // protect() saw both in status colo; the primary's link broke (or its stream was corrupt) at
  // once and its COLO_EXIT was handled before 'protected'. Ignored, the pair would say it is
  // protected while its secondary falls behind: a later death of the primary would hand the
  // service to a secondary that lacks every reply released since.
  const c = protecting({ protectAttemptsMax: 3, stableMs: 30000 });
  assert.deepEqual(run(c, { type: 'coloExit', node: 1, mode: 'primary', reason: 'error' }), []);
  const out = run(c, { type: 'protected' });
  assert.ok(out.includes('kill 2 SIGKILL') && out.includes('discardDisk 2'), `the secondary is killed: ${JSON.stringify(out)}`);
  assert.equal(c.phase, 'unprotected');
  assert.equal(c.secondary, null);
  assert.ok(out.includes('timer retry 100'), `a failed attempt, retried after its pause: ${JSON.stringify(out)}`);
  // Its exit is that of a replaced node; the retry protects the primary again.
  assert.deepEqual(run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' }), []);
  assert.deepEqual(run(c, { type: 'timer', name: 'retry' }), ['pair: re-protecting', 'spawn 3 secondary']);

  // The secondary's COLO_EXIT (its first apply broke off) likewise: it is killed, and its death
  // is the failover to the primary.
  const d = protecting({ protectAttemptsMax: 3 });
  assert.deepEqual(run(d, { type: 'coloExit', node: 2, mode: 'secondary', reason: 'error' }), []);
  assert.deepEqual(run(d, { type: 'protected' }), ['pair: protected (primary pid 101, secondary pid 102)', 'kill 2 SIGKILL']);
  assert.deepEqual(run(d, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' }), ['continueAlone 1', 'discardDisk 2']);

  // A protection that fails forgets a COLO_EXIT seen during it (the primary leaves COLO when
  // the supervisor cancels it): the next protection starts clean.
  assertFailedProtectionForgets({ type: 'coloExit', node: 1, mode: 'primary', reason: 'request' });
});

test('colo up core: a primary whose guest crashes while the protection completes is fenced once the pair is protected: the secondary takes over, and is not killed for the COLO_EXIT that followed the crash', () => {
  // protect() saw both in status colo; the PVM's guest crashed meanwhile (GUEST_PANICKED, then
  // its COLO_EXIT, reason error). Left as it was ("no partner" at 'protecting'), the pair would
  // report itself protected with a dead primary, and the replayed COLO_EXIT would even kill the
  // secondary, the only copy of the service.
  const c = protecting({ protectAttemptsMax: 3 });
  assert.deepEqual(run(c, { type: 'crashed', node: 1, message: 'unreachable', at: 0 }), [], 'no partner yet: not killed now');
  assert.deepEqual(run(c, { type: 'coloExit', node: 1, mode: 'primary', reason: 'error' }), []);
  const out = run(c, { type: 'protected' });
  assert.ok(out.includes('kill 1 SIGKILL'), `the crashed primary is fenced: ${JSON.stringify(out)}`);
  assert.ok(!out.includes('kill 2 SIGKILL'), `the secondary is not killed: ${JSON.stringify(out)}`);
  assert.equal(c.secondary?.id, 2);
  assert.deepEqual(run(c, { type: 'exited', node: 1, code: null, signal: 'SIGKILL' }), ['takeover 2']);
  assert.deepEqual(run(c, { type: 'tookOver', node: 2 }).slice(0, 2), ['discardDisk 1', 'pair: primary died (killed: guest crashed: unreachable); secondary 102 took over on 127.0.0.1:6379']);

  // A protection that fails after its primary's guest crashed leaves nothing to protect (a
  // guest does not come back from a crash): the retry ends the pair, the service lost. Before,
  // a new secondary tried every retry period, for ever, each attempt refused.
  const f = reprotectingBy3();
  assert.deepEqual(run(f, { type: 'crashed', node: 1, message: 'unreachable', at: 0 }), []);
  assert.deepEqual(run(f, { type: 'protectFailed', error: 'cannot migrate a VM in state guest-panicked' }).slice(-1), ['kill 3 SIGKILL']);
  run(f, { type: 'exited', node: 3, code: null, signal: 'SIGKILL' });
  assert.deepEqual(run(f, { type: 'timer', name: 'retry' }), ['pair: failed (the guest of primary 101 crashed (unreachable) and no partner can take over)', 'kill 1 SIGTERM', 'timer stopTimeout 500']);
  assert.equal(f.phase, 'stopping');
});

test('colo up core: a secondary whose guest crashes again and again (upSecondaryCrashesMax within upSecondaryCrashWindowMs) is replaced, not resynced for ever; crashes far apart are not', () => {
  const c = protectedPair();
  const max = limits.upSecondaryCrashesMax;
  const windowMs = limits.upSecondaryCrashWindowMs;
  // Crashes spread wider than the window: each is left to the primary's checkpoint.
  for (let i = 0; i < 2 * max; i++) assert.deepEqual(run(c, { type: 'crashed', node: 2, message: 'unreachable', at: i * (windowMs / (max - 1) + 1) }), [], `crash ${i + 1}, far apart`);
  assert.equal(c.phase, 'protected');
  // Then a burst (a state that crashes only the SVM, every time it runs): the last one of
  // upSecondaryCrashesMax within the window fences it, and its death is the usual failover.
  const t0 = 10 * windowMs;
  for (let i = 0; i < max - 1; i++) assert.deepEqual(run(c, { type: 'crashed', node: 2, message: 'unreachable', at: t0 + i * 10 }), [], `crash ${i + 1} of the burst`);
  const out = c.step({ type: 'crashed', node: 2, message: 'unreachable', at: t0 + max * 10 });
  assert.deepEqual(out.filter((a) => a.type !== 'log').map(show), ['kill 2 SIGKILL'], JSON.stringify(out));
  assert.ok(out.some((a) => a.type === 'log' && a.level === 'warn' && new RegExp(`secondary 102 reports that its guest crashed ${max} times within ${windowMs / 1000} s`).test(a.msg)), JSON.stringify(out));
  assert.deepEqual(run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' }), ['continueAlone 1', 'discardDisk 2']);
  assert.deepEqual(run(c, { type: 'continued', node: 1 }), [
    `pair: secondary died (killed: guest crashed ${max} times within ${windowMs / 1000} s: unreachable); primary 101 continues unprotected`,
    'pair: re-protecting',
    'spawn 3 secondary',
  ]);
});

test('colo up core: the secondary dies and the primary\'s failover cannot run its guest (guestDead): the service is lost, the primary\'s disk kept for the drive; a refused x-colo-lost-heartbeat alone is not', () => {
  const c = protectedPair();
  run(c, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' });
  const failed = c.step({ type: 'failoverFailed', node: 1, error: 'vm1 left COLO with reason error and its guest does not run (state internal-error)', guestDead: true });
  assert.deepEqual(failed.filter((a) => a.type !== 'log').map(show), ['pair: failed (primary 101 could not go on alone after its secondary died (SIGKILL): vm1 left COLO with reason error and its guest does not run (state internal-error))', 'kill 1 SIGTERM', 'timer stopTimeout 500']);
  assert.ok(failed.some((a) => a.type === 'log' && a.level === 'error' && /the service is lost/.test(a.msg)), JSON.stringify(failed));
  assert.ok(!failed.some((a) => a.type === 'print' && /continues unprotected/.test(a.line)));
  assert.deepEqual(run(c, { type: 'exited', node: 1, code: 0, signal: null }), ['pair: stopped', 'exit 1 primary 1']);

  // x-colo-lost-heartbeat refused (its guest runs): the primary goes on, as before.
  const d = protectedPair();
  run(d, { type: 'exited', node: 2, code: null, signal: 'SIGKILL' });
  assert.deepEqual(run(d, { type: 'failoverFailed', node: 1, error: 'boom' })[0], 'pair: secondary died (SIGKILL); primary 101 continues unprotected');
});

test('colo up core: a primary that left COLO by itself and whose guest does not run (guestDead) is fenced, and its living secondary takes over; one whose guest runs goes on as before', () => {
  const c = protectedPair();
  assert.deepEqual(run(c, { type: 'coloExit', node: 1, mode: 'primary', reason: 'error', guestDead: true }), ['kill 1 SIGKILL']);
  assert.equal(c.phase, 'protected');
  const died = run(c, { type: 'exited', node: 1, code: null, signal: 'SIGKILL' });
  assert.ok(died.includes('takeover 2'), JSON.stringify(died));
  assert.deepEqual(run(c, { type: 'tookOver', node: 2 }).filter((l) => l.startsWith('pair: '))[0], 'pair: primary died (killed: left COLO (reason error) and its guest does not run); secondary 102 took over on 127.0.0.1:6379');

  const d = protectedPair();
  const out = run(d, { type: 'coloExit', node: 1, mode: 'primary', reason: 'error' });
  assert.ok(out.includes('pair: primary 101 left COLO (reason error); it continues unprotected') && out.includes('kill 2 SIGKILL'), JSON.stringify(out));
});
