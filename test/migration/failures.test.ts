/**
 * Migrations that end early: cancel, the destination killed, the source killed, a yank. In
 * every case the source guest keeps running and the destination never runs a half-loaded
 * guest. The migrations are slowed with max-bandwidth so that they are surely in flight.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { TestEnv, guests, memwalkRegion, sleep, withTimeout, type VmProcess } from '../framework/harness.js';
import { limits } from '../../src/core/limits.js';
import { coloWireVersion, FrameDecoder, FrameType, frameTypeName, parseJsonPayload, type Frame } from '../../src/migration/stream.js';
import { fakeDestination, plainReady, type FakeConnection } from '../framework/fake-destination.js';
import { assertAdvancing, assertNoErrors, assertStill, memwalkPair, migrateUntilActive, statuses } from './helpers.js';

const slow = { 'max-bandwidth': 8 * 1024 * 1024 };

for (const multifd of [false, true]) {
  const mode = multifd ? 'multifd' : 'plain';
  test(`cancel in mid-migration (${mode}): cancelling → cancelled, the source runs on, the target exits`, async (t) => {
    const env = new TestEnv(t);
    const { src, dst, port } = await memwalkPair(env, { capabilities: { multifd }, parameters: slow });
    const { mark, dstMark } = await migrateUntilActive(src, port, dst);
    await sleep(300);
    await src.qmp.execute('migrate_cancel');
    await src.waitMigrationStatus('cancelled', 10000);
    assert.deepEqual(statuses(src, mark), ['setup', 'active', 'cancelling', 'cancelled']);
    assert.equal(await src.status(), 'running');
    await assertAdvancing(src);
    assert.equal(await dst.waitExit(10000), 1, 'the target exits non-zero');
    assert.equal(dst.eventsOf('RESUME', dstMark).length, 0, 'the target never ran');
    assert.match(dst.stderr, /incoming migration cancelled: the source cancelled the migration/);
    assertNoErrors(src, dst);
  });

  test(`regression: migrate_cancel while the main channel connects (${mode}): the destination is told, not left waiting for rounds`, async (t) => {
    const env = new TestEnv(t);
    const { src, dst, port } = await memwalkPair(env, { capabilities: { multifd } });
    const mark = src.qmp.eventCount;
    const dstMark = dst.qmp.eventCount;
    // Sent back to back: the cancel is handled before the connection to the destination is up.
    await Promise.all([src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` }), src.qmp.execute('migrate_cancel')]);
    await src.waitMigrationStatus('cancelled', 10000);
    assert.deepEqual(statuses(src, mark), ['setup', 'cancelling', 'cancelled']);
    assert.equal(await src.status(), 'running');
    // Before the fix the connection came up after the cancel, said hello, and the target sat
    // in status active for ever (its port taken, a later migration to it refused).
    assert.equal(await dst.waitExit(10000), 1, 'the target learns of the cancel and exits');
    assert.deepEqual(statuses(dst, dstMark), ['active', 'cancelled']);
    assert.equal(dst.eventsOf('RESUME', dstMark).length, 0, 'the target never ran');
    await assertAdvancing(src);
    assertNoErrors(src, dst);
  });
}

/** A migration cancelled while its destination does not read (SIGSTOP): the stream fills the socket buffers. */
async function cancelWhileStalled(env: TestEnv, multifd = false): Promise<{ src: VmProcess; dst: VmProcess; mark: number; dstMark: number }> {
  // No max-bandwidth: the stream fills the socket buffers as soon as the destination stops reading.
  // A downtime limit of 1 ms: the walk dirties too much for the rounds to converge (multifd
  // would otherwise reach stop-and-copy before the stop).
  const { src, dst, port } = await memwalkPair(env, { region: '64M', memory: '128M', capabilities: { multifd }, parameters: { 'downtime-limit': 1 } });
  env.onCleanup(() => dst.kill('SIGCONT'));
  const { mark, dstMark } = await migrateUntilActive(src, port, dst);
  await sleep(100);
  dst.kill('SIGSTOP');
  await sleep(500);
  assert.equal(await src.migrationStatus(), 'active', 'the migration waits for the stopped destination');
  await src.qmp.execute('migrate_cancel');
  await src.waitMigrationStatus('cancelled', 10000);
  assert.equal(await src.status(), 'running');
  return { src, dst, mark, dstMark };
}

for (const multifd of [false, true]) {
  const what = multifd
    ? 'the multifd channels are stalled (the destination not reading for a while): the destination logs a cancel, not the channels cut mid-packet'
    : 'the plain channel is stalled (the destination not reading for a while): the destination reads up to the abort and logs a cancel, not an error';
  test(`regression: migrate_cancel while ${what}`, async (t) => {
    const env = new TestEnv(t);
    const { src, dst, mark, dstMark } = await cancelWhileStalled(env, multifd);
    assert.deepEqual(statuses(src, mark), ['setup', 'active', 'cancelling', 'cancelled']);
    // Longer than the bound the source used to give the channel before dropping it (1 s), and
    // than limits.multifdEndWaitMs.
    await sleep(2000);
    dst.kill('SIGCONT');
    assert.equal(await dst.waitExit(15000), 1, 'the target exits non-zero');
    assert.match(dst.stderr, / info migration: incoming migration cancelled: the source cancelled the migration/);
    assert.deepEqual(statuses(dst, dstMark), ['active', 'cancelled']);
    assert.equal(dst.eventsOf('RESUME', dstMark).length, 0, 'the target never ran');
    await assertAdvancing(src);
    assertNoErrors(src, dst);
  });
}

test('quit on the source right after migrate_cancel, the destination still not reading: the channel kept open for the abort does not hold the exit', async (t) => {
  const env = new TestEnv(t);
  const { src } = await cancelWhileStalled(env);
  await src.qmp.execute('quit');
  assert.equal(await src.waitExit(5000), 0, 'the source exits promptly');
  assertNoErrors(src);
});

/**
 * Runs `commands` on a QMP connection of their own, written to the socket in one write (the
 * capabilities negotiation first); resolves with their replies, in order.
 */
async function executeInOneWrite(qmpPath: string, commands: Record<string, unknown>[]): Promise<unknown[]> {
  const socket = net.connect({ path: qmpPath });
  socket.on('error', () => undefined);
  try {
    const lines: Record<string, unknown>[] = [];
    let buffered = '';
    let wake: () => void = () => undefined;
    socket.on('data', (chunk: Buffer) => {
      buffered += chunk.toString('utf8');
      for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n')) {
        const line = JSON.parse(buffered.slice(0, nl)) as Record<string, unknown>;
        buffered = buffered.slice(nl + 1);
        if (!('event' in line)) lines.push(line);
        wake();
      }
    });
    const replies = async (n: number, what: string): Promise<Record<string, unknown>[]> => {
      await withTimeout(
        new Promise<void>((resolve) => {
          wake = () => {
            if (lines.length >= n) resolve();
          };
          wake();
        }),
        10000,
        what,
      );
      return lines.splice(0, n);
    };
    await replies(1, 'the QMP greeting');
    socket.write('{"execute":"qmp_capabilities"}\n');
    await replies(1, 'the reply to qmp_capabilities');
    socket.write(commands.map((c) => JSON.stringify(c) + '\n').join(''));
    return await replies(commands.length, `the replies to ${commands.map((c) => String(c.execute)).join(', ')}`);
  } finally {
    socket.destroy();
  }
}

test('regression: quit right after a migrate_cancel that came while the main channel connected, the destination not closing its end: the late channel does not hold the exit', async (t) => {
  const env = new TestEnv(t);
  const src = await env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '96M'], guestArgs: ['32M'] });
  await src.waitSerial('B', { count: 3 });
  // A destination that accepts and reads, but never answers nor closes its end (a busy or
  // stalled host): the source's close, after its abort frame, waits for it.
  const frames: string[] = [];
  const sockets: net.Socket[] = [];
  let sawAbort!: () => void;
  const abortSeen = new Promise<void>((r) => (sawAbort = r));
  // allowHalfOpen: the source's FIN does not end this side too.
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    sockets.push(socket);
    socket.on('error', () => undefined);
    const decoder = new FrameDecoder();
    socket.on('data', (chunk: Buffer) => {
      decoder.push(chunk);
      for (let f = decoder.next(); f !== null; f = decoder.next()) {
        frames.push(frameTypeName(f.type));
        if (f.type === FrameType.abort) sawAbort();
      }
    });
  });
  env.onCleanup(() => {
    for (const s of sockets) s.destroy();
    server.close();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const a = server.address();
  const port = typeof a === 'object' && a !== null ? a.port : 0;
  const mark = src.qmp.eventCount;
  // In one write: the server runs both before it next polls for I/O, so the cancel is
  // handled before the connection is up. (Sent as two writes they were sometimes read apart,
  // and the connection came up between them.)
  const replies = await executeInOneWrite(src.qmpPath, [
    { execute: 'migrate', arguments: { uri: `tcp:127.0.0.1:${port}` } },
    { execute: 'migrate_cancel' },
  ]);
  assert.deepEqual(replies, [{ return: {} }, { return: {} }]);
  await src.waitMigrationStatus('cancelled', 10000);
  assert.deepEqual(statuses(src, mark), ['setup', 'cancelling', 'cancelled']);
  await withTimeout(abortSeen, 10000, 'the abort frame at the destination');
  // Only the abort: the connection came up after the cancel (no hello, no setup).
  assert.deepEqual(frames, ['abort']);
  const quitAt = Date.now();
  await src.qmp.execute('quit');
  // Before the fix the connection, closed where nothing kept it, held the process for its
  // close's 1 s bound (the destination never closing its end).
  assert.equal(await src.waitExit(5000), 0, 'the source exits');
  const ms = Date.now() - quitAt;
  t.diagnostic(`exited ${ms} ms after quit`);
  assert.ok(ms < 500, `the source exits promptly after quit (took ${ms} ms)`);
  assertNoErrors(src);
});

test('regression: a migration started after a cancelled one whose channel is still open for its abort (the destination not reading): quit does not wait for the old channel', async (t) => {
  const env = new TestEnv(t);
  const { src } = await cancelWhileStalled(env);
  // A second migration (to a file: it completes at once) replaces the cancelled one.
  const mark = src.qmp.eventCount;
  await src.qmp.execute('migrate', { uri: `file:${env.file('after-cancel.state')}` });
  await src.waitMigrationStatus('completed', 20000);
  assert.deepEqual(statuses(src, mark), ['setup', 'active', 'device', 'completed']);
  await src.qmp.execute('quit');
  // The cancelled migration's channel waited limits.migrationAbortDeliveryMs (30 s) for the stopped destination.
  assert.equal(await src.waitExit(5000), 0, 'the source exits promptly');
  assertNoErrors(src);
});

test('the destination killed mid-migration: the source reports failed and runs on', async (t) => {
  const env = new TestEnv(t);
  const { src, dst, port } = await memwalkPair(env, { capabilities: { multifd: true }, parameters: slow });
  const { mark } = await migrateUntilActive(src, port);
  await sleep(300);
  dst.kill('SIGKILL');
  const info = await src.waitMigrationStatus('failed', 15000);
  assert.match(String(info['error-desc']), /closed|reset|broken|EPIPE|ECONNRESET|failed/i);
  t.diagnostic(`error-desc: ${String(info['error-desc'])}`);
  assert.equal(await src.status(), 'running');
  await assertAdvancing(src);
  // A failed migration is a warning on the source (it is unharmed), never an error line.
  assert.match(src.stderr, / warn migration: migration failed: /);
  assertNoErrors(src);
});

test('the source killed mid-migration: the destination reports failed clearly and exits non-zero', async (t) => {
  const env = new TestEnv(t);
  const { src, dst, port } = await memwalkPair(env, { capabilities: { multifd: true }, parameters: slow });
  const { mark, dstMark } = await migrateUntilActive(src, port, dst);
  await sleep(300);
  src.kill('SIGKILL');
  assert.equal(await dst.waitExit(15000), 1);
  const lines = dst.errorLines();
  assert.equal(lines.length, 1, `one error line: ${dst.stderr}`);
  assert.match(lines[0]!, /incoming migration failed: .*\[(CHANNEL_CLOSED|STREAM_TRUNCATED)\]/);
  assert.doesNotMatch(dst.stderr, /\n\s+at /, 'no stack trace');
  assert.equal(dst.eventsOf('RESUME', dstMark).length, 0, 'the target never ran');
  assert.ok(statuses(dst, dstMark).includes('failed'));
});

test('regression: the source killed and the destination stopped a moment later (a pair stopped together): the destination sees its stream end first, and still logs no error', async (t) => {
  const env = new TestEnv(t);
  const { src, dst, port } = await memwalkPair(env, { parameters: slow });
  const { mark, dstMark } = await migrateUntilActive(src, port, dst);
  await sleep(300);
  src.kill('SIGKILL');
  // The destination has seen the stream end (its status is failed) before its own stop comes:
  // the order in which a supervisor's stop of both processes can reach it.
  await dst.waitEvent('MIGRATION', { after: dstMark, where: (e) => e.data.status === 'failed', timeoutMs: 10000 });
  dst.kill('SIGTERM');
  assert.equal(await dst.waitExit(10000), 0, 'the destination exits as it was told to');
  assert.match(dst.stderr, / info migration: incoming migration ended as this process exits: .*\[(CHANNEL_CLOSED|STREAM_TRUNCATED)\]/);
  assertNoErrors(dst);
  assert.equal(dst.eventsOf('RESUME', dstMark).length, 0, 'the target never ran');
});

test('yank on the source mid-migration: failed, the source runs on', async (t) => {
  const env = new TestEnv(t);
  const { src, dst, port } = await memwalkPair(env, { parameters: slow });
  const { mark } = await migrateUntilActive(src, port);
  await src.yankMigration();
  const info = await src.waitMigrationStatus('failed', 10000);
  assert.match(String(info['error-desc']), /yanked/);
  assert.equal(await src.status(), 'running');
  await assertAdvancing(src);
  assert.equal(await dst.waitExit(10000), 1);
  assertNoErrors(src);
});

test("migrate with QEMU's arguments colo-vm does not support (resume, blk, inc): refused with the reason, nothing starts", async (t) => {
  const env = new TestEnv(t);
  const { src, dst, port } = await memwalkPair(env, { region: '8M', memory: '32M' });
  const uri = `tcp:127.0.0.1:${port}`;
  const refusal = async (args: Record<string, unknown>): Promise<string> => {
    try {
      await src.qmp.execute('migrate', { uri, ...args });
    } catch (err) {
      return (err as Error).message;
    }
    return 'accepted';
  };
  assert.match(await refusal({ resume: true }), /postcopy recovery \(resume\) is not supported/);
  // Before, the argument check answered "Parameter 'blk' is unexpected", which did not say why.
  assert.match(await refusal({ blk: true }), /block migration \(blk\) is not supported by colo-vm: the disk always travels with the migration/);
  assert.match(await refusal({ inc: true }), /block migration \(inc\) is not supported by colo-vm/);
  assert.equal(await src.migrationStatus(), 'none', 'no migration was started');
  assert.equal(await src.status(), 'running');
  // What QEMU accepts as off (or ignores, detach) still migrates.
  const mark = src.qmp.eventCount;
  await src.qmp.execute('migrate', { uri, blk: false, inc: false, resume: false, detach: true });
  await src.waitMigrationStatus('completed', 20000);
  assert.deepEqual(statuses(src, mark), ['setup', 'active', 'device', 'completed']);
  await dst.waitMigrationStatus('completed', 10000);
  assertNoErrors(src, dst);
});

test('a destination without multifd refuses a multifd source: both say why in one line', async (t) => {
  const env = new TestEnv(t);
  const { src, dst, port } = await memwalkPair(env, { region: '8M', memory: '32M' });
  await src.setMigration({ multifd: true });
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  const info = await src.waitMigrationStatus('failed', 10000);
  assert.match(String(info['error-desc']), /the destination refused the migration: the source uses multifd \(2 channels\) but the capability multifd is off on the destination \[DESTINATION_REFUSED\]/);
  assert.equal(await src.status(), 'running');
  assert.equal(await dst.waitExit(10000), 1);
  assert.match(dst.errorLines().join('\n'), /multifd is off on the destination \[MIGRATION_REFUSED\]/);
  assertNoErrors(src);
});

/**
 * A destination that freezes after round 1: it answers the handshake (`ready`, no disk, no
 * multifd) and reads the stream until round 1's roundEnd, then stops reading, as a frozen or
 * partitioned host does (its TCP window closes). `thaw()` reads the rest until the source
 * closes the connection and returns the type names of every frame received after the freeze.
 */
class FrozenDestination {
  socket: net.Socket | null = null;
  frozen = false;
  private readonly afterFreeze: string[] = [];
  private closed!: Promise<void>;

  static async start(env: TestEnv): Promise<{ dest: FrozenDestination; port: number }> {
    const dest = new FrozenDestination();
    const { port } = await fakeDestination(
      env,
      (f, c) => dest.onFrame(f, c),
      (c) => {
        dest.socket = c.socket;
        dest.closed = new Promise((resolve) => c.socket.once('close', () => resolve()));
      },
    );
    return { dest, port };
  }

  private onFrame(f: Frame, c: FakeConnection): void {
    if (this.frozen) {
      this.afterFreeze.push(frameTypeName(f.type));
      // As a real destination: the source's abort ends the migration, and the connection.
      if (f.type === FrameType.abort) c.socket.end();
    } else if (f.type === FrameType.setup) c.reply(plainReady());
    else if (f.type === FrameType.roundEnd && parseJsonPayload(f).round === 1) {
      this.frozen = true;
      c.socket.pause();
    }
  }

  async thaw(timeoutMs = 10000): Promise<string[]> {
    assert.ok(this.socket !== null, 'the source connected');
    this.socket.resume();
    await withTimeout(this.closed, timeoutMs, 'the source to close the frozen connection');
    return this.afterFreeze;
  }
}

/**
 * A source whose final round cannot be written: the destination froze after round 1. The
 * guest region (128 MiB, all of it dirtied again during the slow round 1) is more than the
 * socket buffers on both ends hold (kernel send and receive buffers, ≤ 4 + 32 MiB here, and
 * the channel's own limits.mainChannelWriteBufferBytesMax), so the last round blocks. A
 * downtime limit far above the expected downtime makes round 1 the last precopy round.
 */
async function sourceStuckInFinalRound(env: TestEnv, opts: { stopWhileActive?: boolean } = {}): Promise<{ src: Awaited<ReturnType<TestEnv['startVm']>>; dest: FrozenDestination; mark: number; pausedAt: number }> {
  const src = await env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '192M'], guestArgs: ['128M'] });
  await src.setMigration({}, { 'max-bandwidth': 64 * 1024 * 1024, 'downtime-limit': 1_000_000 });
  await src.waitSerial('B', { count: 3 });
  assert.ok(memwalkRegion(src.serial()), 'memwalk printed its region');
  const { dest, port } = await FrozenDestination.start(env);
  const mark = src.qmp.eventCount;
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  if (opts.stopWhileActive === true) {
    await src.waitEvent('MIGRATION', { after: mark, where: (e) => e.data.status === 'active' });
    await src.qmp.execute('stop');
    assert.equal(await src.migrationStatus(), 'active', 'stopped during round 1');
  }
  await src.waitEvent('MIGRATION', { after: mark, where: (e) => e.data.status === 'device', timeoutMs: 60000 });
  const pausedAt = Date.now();
  assert.ok(dest.frozen, 'the destination froze at the end of round 1');
  assert.equal(await src.status(), 'finish-migrate');
  return { src, dest, mark, pausedAt };
}

test('regression: a destination that stops reading during stop-and-copy: the pause ends at switchoverTimeoutMs, failed, the source runs on', async (t) => {
  const env = new TestEnv(t);
  const { src, dest, mark, pausedAt } = await sourceStuckInFinalRound(env);
  // The bound runs from the pause; the margin is for a loaded machine, not for the protocol.
  const info = await src.waitMigrationStatus('failed', limits.switchoverTimeoutMs + 15000);
  t.diagnostic(`failed ${Date.now() - pausedAt} ms after the pause: ${String(info['error-desc'])}`);
  assert.match(String(info['error-desc']), /switchover did not finish within switchoverTimeoutMs \(30000 ms\) of pausing the VM: the destination did not take the last round .*\[SWITCHOVER_TIMEOUT\]/);
  assert.deepEqual(statuses(src, mark), ['setup', 'active', 'device', 'failed']);
  assert.equal(await src.status(), 'running');
  await assertAdvancing(src);
  // The source was still writing the last round: neither the device state nor `end` left it.
  const frames = await dest.thaw();
  assert.ok(frames.length > 0, 'the last round had started');
  assert.ok(frames.every((f) => f === 'ramPages' || f === 'ramZero'), `only pages of the last round after the freeze: ${[...new Set(frames)].join(', ')}`);
  assertNoErrors(src);
});

for (const how of ['migrate_cancel', 'yank'] as const) {
  test(`${how} while the last round is blocked on a frozen destination: the VM runs again at once`, async (t) => {
    const env = new TestEnv(t);
    const { src, dest, mark } = await sourceStuckInFinalRound(env);
    await sleep(500); // the last round's writes are blocked by now
    if (how === 'yank') await src.yankMigration();
    else await src.qmp.execute('migrate_cancel');
    const want = how === 'yank' ? 'failed' : 'cancelled';
    // Far below switchoverTimeoutMs: neither waits for the blocked writes.
    const info = await src.waitMigrationStatus(want, 10000);
    if (how === 'yank') assert.match(String(info['error-desc']), /yanked/);
    assert.deepEqual(statuses(src, mark), ['setup', 'active', 'device', ...(how === 'yank' ? [] : ['cancelling']), want]);
    assert.equal(await src.status(), 'running');
    await assertAdvancing(src);
    const frames = await dest.thaw();
    assert.ok(!frames.includes('end') && !frames.includes('deviceState'), `the last round was cut short: ${[...new Set(frames)].join(', ')}`);
    // A cancel is said to the destination, behind what was queued: it reads up to it.
    if (how === 'migrate_cancel') assert.equal(frames.at(-1), 'abort', `the stream ends with the abort frame: ${[...new Set(frames)].join(', ')}`);
    assertNoErrors(src);
  });
}

test('regression: a migration that fails after the user stopped the VM during it leaves the VM paused', async (t) => {
  const env = new TestEnv(t);
  const { src, dest } = await sourceStuckInFinalRound(env, { stopWhileActive: true });
  // Stop-and-copy has the VM (finish-migrate): cont is refused there, as QEMU's.
  await assert.rejects(src.qmp.execute('cont'), /Migration is not finalized yet/);
  assert.equal(await src.status(), 'finish-migrate');
  await src.yankMigration();
  await src.waitMigrationStatus('failed', 10000);
  assert.equal(await src.status(), 'paused', 'the VM the user stopped stays stopped (and not in finish-migrate)');
  await assertStill(src);
  await dest.thaw();
  await src.qmp.execute('cont');
  await assertAdvancing(src);
  assertNoErrors(src);
});

test('stop during the switchover (finish-migrate) changes nothing, as QEMU\'s: a migration that fails then runs the VM again, as it ran at the pause', async (t) => {
  const env = new TestEnv(t);
  const { src, dest, mark } = await sourceStuckInFinalRound(env);
  // QEMU's qmp_stop → vm_stop acts only on a running VM; its failure path then restarts the
  // VM from the run state recorded at the completion pause (vm_old_state).
  await src.qmp.execute('stop');
  assert.equal(await src.status(), 'finish-migrate', 'stop leaves the switchover\'s state');
  assert.equal(src.eventsOf('STOP', mark).length, 1, 'only the switchover\'s own STOP');
  await src.yankMigration();
  await src.waitMigrationStatus('failed', 10000);
  assert.equal(await src.status(), 'running');
  await assertAdvancing(src);
  await dest.thaw();
  assertNoErrors(src);
});

/** A slow memwalk migration, and the source VM stopped once it is active. */
async function stoppedDuringMigration(t: TestContext) {
  const env = new TestEnv(t);
  const { src, dst, port, region } = await memwalkPair(env, { parameters: slow });
  const { mark, dstMark } = await migrateUntilActive(src, port, dst);
  await src.qmp.execute('stop');
  return { src, dst, region, mark, dstMark };
}

test('regression: a VM stopped during the migration arrives paused with its memory whole', async (t) => {
  const { src, dst, region, mark, dstMark } = await stoppedDuringMigration(t);
  assert.equal(await src.migrationStatus(), 'active', 'stopped while the migration was active');
  await src.waitMigrationStatus('completed', 60000);
  await dst.waitMigrationStatus('completed', 10000);
  assert.equal(await src.status(), 'postmigrate');
  assert.equal(await dst.status(), 'paused');
  await assertStill(dst);
  assert.equal(dst.eventsOf('RESUME', dstMark).length, 0, 'the target never ran');
  assert.equal(await dst.memwalkCheck(region), null, 'the target memory passes the memwalk pattern check');
  await dst.qmp.execute('cont');
  await assertAdvancing(dst);
  assertNoErrors(src, dst);
});

test('stop and then cont during an outgoing migration (as QEMU): the guest runs again, the rounds send what it dirties, and the destination runs it with its memory whole', async (t) => {
  const { src, dst, region, mark, dstMark } = await stoppedDuringMigration(t);
  assert.equal(await src.status(), 'paused');
  await src.qmp.execute('cont');
  assert.equal(await src.status(), 'running');
  // The guest runs while round 1 (32 MiB at 8 MiB/s) is still on its way.
  await assertAdvancing(src, 2);
  assert.equal(await src.migrationStatus(), 'active', 'the guest ran again during the migration');
  // At full speed the rounds catch up with the running guest.
  await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
  const info = await src.waitMigrationStatus('completed', 60000);
  assert.ok(statuses(src, mark).every((st) => st !== 'failed' && st !== 'cancelled'), `statuses: ${statuses(src, mark).join(', ')}`);
  // Round 1 held the walk once; what the guest dirtied after cont went again in the rounds after.
  const ram = info.ram as { normal: number; 'dirty-sync-count': number };
  const regionPages = region.size / 4096;
  assert.ok(ram['dirty-sync-count'] >= 1 && ram.normal > regionPages * 1.25, `pages dirtied after cont were sent again: ${JSON.stringify(ram)} (the walk is ${regionPages} pages)`);
  await dst.waitMigrationStatus('completed', 10000);
  // The VM ran at the switchover: the destination runs it.
  await dst.waitEvent('RESUME', { after: dstMark, timeoutMs: 10000 });
  await assertAdvancing(dst);
  assert.equal(await src.status(), 'postmigrate');
  assert.equal(await dst.memwalkCheck(region), null, 'the target memory passes the memwalk pattern check');
  assertNoErrors(src, dst);
});

for (const multifd of [false, true]) {
  test(`regression: quit on the source during stop-and-copy, the destination frozen (${multifd ? 'multifd' : 'plain'}): the process exits at once, no error line`, async (t) => {
    const env = new TestEnv(t);
    // 64 MiB dirtied during round 1: the last round is more than the socket buffers hold.
    const { src, dst, port } = await memwalkPair(env, { region: '64M', memory: '128M', capabilities: { multifd }, parameters: { 'max-bandwidth': 32 * 1024 * 1024, 'downtime-limit': 1_000_000 } });
    env.onCleanup(() => dst.kill('SIGCONT'));
    const mark = src.qmp.eventCount;
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    await src.waitEvent('MIGRATION', { after: mark, where: (e) => e.data.status === 'device', timeoutMs: 60000 });
    dst.kill('SIGSTOP');
    await sleep(300);
    assert.equal(await src.migrationStatus(), 'device', 'the last round is blocked');
    await src.qmp.execute('quit');
    // Before the fix a multifd source stayed until the switchover timeout (30 s), then started
    // new multifd sender threads that kept it alive for good; both logged "could not resume".
    assert.equal(await src.waitExit(10000), 0, 'the source exits promptly');
    assert.match(src.stderr, / warn migration: migration failed: the VM is quitting/);
    assertNoErrors(src);
  });
}

test('regression: quit on the source while a plain round waits for max-bandwidth: the process exits at once', async (t) => {
  const env = new TestEnv(t);
  // At 32 KiB/s the first 512 KiB frame of pages is followed by a 16 s wait.
  const { src, port } = await memwalkPair(env, { parameters: { 'max-bandwidth': 32 * 1024 } });
  const { mark } = await migrateUntilActive(src, port);
  await sleep(500);
  const quitAt = Date.now();
  await src.qmp.execute('quit');
  // Before the fix the wait's timer kept the process alive until it expired.
  assert.equal(await src.waitExit(5000), 0, 'the source exits promptly');
  t.diagnostic(`exited ${Date.now() - quitAt} ms after quit`);
  assertNoErrors(src);
});

/**
 * A destination of a build from before COLO's messages had a version: it ignores the hello's
 * `colo` and answers `ready` naming none (or, `colo` given, another version). It records the
 * frames it reads after `ready`.
 */
async function olderColoDestination(env: TestEnv, colo?: number): Promise<{ port: number; afterReady: string[]; closed: Promise<void> }> {
  const afterReady: string[] = [];
  let closedNow!: () => void;
  const closed = new Promise<void>((r) => (closedNow = r));
  let ready = false;
  const { port } = await fakeDestination(
    env,
    (f, c) => {
      if (ready) afterReady.push(frameTypeName(f.type));
      else if (f.type === FrameType.setup) {
        ready = true;
        c.reply(plainReady(colo === undefined ? {} : { colo }));
      }
    },
    (c) => c.socket.once('close', () => closedNow()),
  );
  return { port, afterReady, closed };
}

for (const colo of [undefined, coloWireVersion + 1]) {
  test(`a COLO source refuses a destination that ${colo === undefined ? 'names no COLO protocol version in its ready (an older build, which does not check the hello\'s)' : 'names another COLO protocol version in its ready'}: failed before a page is sent, the source runs on`, async (t) => {
    const env = new TestEnv(t);
    const src = await env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '32M'], guestArgs: ['8M'] });
    await src.waitSerial('B', { count: 1 });
    await src.setMigration({ 'x-colo': true });
    const dest = await olderColoDestination(env, colo);
    const mark = src.qmp.eventCount;
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${dest.port}` });
    const info = await src.waitMigrationStatus('failed', 10000);
    const theirs = colo === undefined ? 'no COLO protocol version \\(an older build\\)' : `COLO protocol version ${colo}`;
    assert.match(String(info['error-desc']), new RegExp(`the destination speaks ${theirs}, this source ${coloWireVersion} \\[COLO_VERSION_MISMATCH\\]`));
    assert.deepEqual(statuses(src, mark), ['setup', 'failed']);
    await withTimeout(dest.closed, 10000, 'the source to close the connection');
    assert.deepEqual(dest.afterReady.filter((f) => f !== 'abort'), [], 'no round, no COLO frame after ready');
    assert.equal(await src.status(), 'running');
    await assertAdvancing(src);
    assertNoErrors(src);
  });
}

/**
 * A destination that answers the handshake and then fails with an `error` reply carrying
 * `code` (absent: an older destination's reply, which has none).
 */
async function failingDestination(env: TestEnv, code: unknown): Promise<number> {
  const { port } = await fakeDestination(env, (f, c) => {
    if (f.type === FrameType.setup) c.reply(plainReady());
    else if (f.type === FrameType.roundEnd) {
      c.reply({ kind: 'error', message: 'the disk is full', ...(code === undefined ? {} : { code }) });
      c.socket.end();
    }
  });
  return port;
}

for (const [code, shown] of [['DISK_FULL', 'DISK_FULL'], [undefined, 'DESTINATION_FAILED'], ['not a code] [X', 'DESTINATION_FAILED'], [42, 'DESTINATION_FAILED']] as const) {
  test(`the destination's error reply ${code === undefined ? 'without a code (an older destination)' : `with code ${JSON.stringify(code)}`}: error-desc on the source ends in [${shown}]`, async (t) => {
    const env = new TestEnv(t);
    const src = await env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '32M'], guestArgs: ['8M'] });
    await src.waitSerial('B', { count: 2 });
    const port = await failingDestination(env, code);
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    const info = await src.waitMigrationStatus('failed', 15000);
    assert.equal(String(info['error-desc']), `the destination failed: the disk is full [${shown}]`);
    assert.equal(await src.status(), 'running');
    await assertAdvancing(src);
    assertNoErrors(src);
  });
}
