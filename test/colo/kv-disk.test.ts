/**
 * kv.wasm under COLO without network mirroring yet: every write acknowledged before a
 * completed checkpoint must be on the secondary after the primary dies — in its RAM and on
 * its disk (disk blocks travel in the checkpoint and are applied with it).
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { TestEnv, freePort, guests, startKvSourceAndTarget, waitFor, type VmProcess } from '../framework/harness.js';
import { AckedWriter, RespClient, countMissing } from '../framework/resp.js';
import { assertNoErrors } from '../migration/helpers.js';
import { watGuest } from '../framework/machine.js';
import { rssBytes } from '../framework/flood.js';
import { limits } from '../../src/core/limits.js';

test('colo: kv writes acknowledged before a checkpoint survive the primary, RAM and disk', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const [srcDisk, dstDisk] = [env.image('src.img', 8 * 1024 * 1024), env.image('dst.img', 8 * 1024 * 1024)];
  const common = ['--memory', '256M', '--net', `listen=127.0.0.1:${port}`];
  const [src, dst] = await startKvSourceAndTarget(env, common, { src: ['--drive', `file=${srcDisk}`], dst: ['--drive', `file=${dstDisk}`] });
  await Promise.all([src.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': 200 }), dst.setMigration({ 'x-colo': true })]);
  await src.waitSerial('kv ready');
  const migPort = await dst.listenIncoming();
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  await src.waitMigrationStatus('colo', 30000);

  const writer = await AckedWriter.start(port, 'colo:');
  env.onCleanup(() => writer.stop());
  await waitFor('acknowledged writes', () => writer.acked.size >= 300, 20000);
  const acked = new Map(writer.acked);
  // A checkpoint that starts after these acknowledgements and completes: two RESUMEs later.
  const mark = dst.qmp.eventCount;
  await dst.waitEvent('RESUME', { after: mark, nth: 2, timeoutMs: 10000 });
  src.kill('SIGKILL');
  await writer.ended();
  await dst.qmp.execute('x-colo-lost-heartbeat', {}, { oob: true });
  await dst.waitEvent('COLO_EXIT', { after: mark, timeoutMs: 10000 });

  const reader = await RespClient.whenServing(port, 'the secondary serving on the service address');
  env.onCleanup(() => reader.close());
  assert.equal(await countMissing(reader, acked), 0, 'writes acknowledged before the checkpoint are in the secondary');
  assert.equal(await reader.command(['SET', 'after', 'takeover']), 'OK');
  await dst.stop();

  // The secondary's disk log holds them too: a fresh kv on its image replays them.
  const again = await env.startVm({ name: 'again', guest: guests.kv, args: ['--memory', '256M', '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${dstDisk}`] });
  await again.waitSerial('kv ready');
  const r2 = await RespClient.connect(port);
  env.onCleanup(() => r2.close());
  assert.equal(await countMissing(r2, acked), 0, 'the secondary disk holds every acknowledged write');
  assert.equal(await r2.command(['GET', 'after']), 'takeover');
  assertNoErrors(dst, again);
});

for (const extra of [[], ['--snapshot']]) {
  test(`colo: a secondary on the primary\'s own image (${extra.length === 0 ? 'no --snapshot' : '--snapshot on the secondary only: it starts, inactive, as QEMU\'s'}) is refused; the primary serves on, its image untouched by the secondary`, async (t) => {
    const env = new TestEnv(t);
    const port = await freePort();
    const image = env.image('one.img', 8 * 1024 * 1024);
    const common = ['--memory', '64M', '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`];
    const [src, dst] = await startKvSourceAndTarget(env, common, { dst: extra });
    await Promise.all([src.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': 200 }), dst.setMigration({ 'x-colo': true })]);
    await src.waitSerial('kv ready');
    const c = await RespClient.connect(port);
    env.onCleanup(() => c.close());
    assert.equal(await c.command(['SET', 'before', '1']), 'OK');
    const migPort = await dst.listenIncoming();
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
    const info = await src.waitMigrationStatus('failed', 10000);
    assert.match(String(info['error-desc']), /the destination refused the migration: COLO needs a disk of its own on the secondary \(or both nodes with --snapshot\): both nodes open the same image file \[DESTINATION_REFUSED\]/);
    assert.equal(await src.status(), 'running');
    assert.equal(await dst.waitExit(10000), 1);
    assert.match(dst.errorLines().join('\n'), /COLO needs a disk of its own on the secondary.*\[MIGRATION_REFUSED\]/);
    assert.equal(await c.command(['SET', 'after', '2']), 'OK', 'the primary serves on');
    assert.equal(await c.command(['GET', 'before']), '1');
    assertNoErrors(src);
  });
}

/**
 * A guest that writes its whole disk (`diskBytes`) over and over, `chunk` bytes of 0x5a per
 * fd_pwrite, as fast as it can.
 */
function diskRewriter(t: TestContext, diskBytes: number, chunk: number): string {
  return watGuest(t, 'diskloop', `(module
    (import "wasi_snapshot_preview1" "fd_pwrite" (func $pw (param i32 i32 i32 i64 i32) (result i32)))
    (memory (export "memory") ${(chunk + 65536) / 65536})
    (func (export "_start") (local $i i32) (local $off i64)
      (loop $fill
        (i32.store8 (i32.add (i32.const 65536) (local.get $i)) (i32.const 0x5a))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $fill (i32.lt_u (local.get $i) (i32.const ${chunk}))))
      (i32.store (i32.const 16) (i32.const 65536))
      (i32.store (i32.const 20) (i32.const ${chunk}))
      (loop $write
        (drop (call $pw (i32.const 4) (i32.const 16) (i32.const 1) (local.get $off) (i32.const 24)))
        (local.set $off (i64.rem_u (i64.add (local.get $off) (i64.const ${chunk})) (i64.const ${diskBytes})))
        (br $write))))`);
}

/**
 * A source and a `--incoming defer` destination (64M) of diskRewriter (1 MiB per fd_pwrite),
 * each on its own zeroed image of `diskBytes`.
 */
async function rewriterPair(t: TestContext, env: TestEnv, diskBytes: number): Promise<[VmProcess, VmProcess]> {
  const guest = diskRewriter(t, diskBytes, 1024 * 1024);
  const [srcDisk, dstDisk] = [env.image('src.img', diskBytes), env.image('dst.img', diskBytes)];
  return Promise.all([
    env.startVm({ name: 'src', guest, args: ['--memory', '64M', '--drive', `file=${srcDisk}`] }),
    env.startVm({ name: 'dst', guest, args: ['--memory', '64M', '--drive', `file=${dstDisk}`, '--incoming', 'defer'] }),
  ]);
}

test('colo: a checkpoint whose disk blocks exceed the copy bound is sent from the disk with the PVM paused, not copied into one buffer the size of what the guest wrote', async (t) => {
  const env = new TestEnv(t);
  const diskBytes = 128 * 1024 * 1024;
  // Writes its whole disk over and over, 1 MiB per fd_pwrite: every checkpoint interval dirties
  // more blocks than limits.coloCheckpointCopyBytesMax (about 25 MB/s is enough).
  const [src, dst] = await rewriterPair(t, env, diskBytes);
  await Promise.all([src.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': 4000 }), dst.setMigration({ 'x-colo': true })]);
  const migPort = await dst.listenIncoming();
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  await src.waitMigrationStatus('colo', 60000);
  await dst.waitEvent('RESUME', { timeoutMs: 60000 });
  for (let i = 0; i < 2; i++) await dst.waitEvent('RESUME', { after: dst.qmp.eventCount, timeoutMs: 30000 });
  const counters = ((await src.qmp.execute('query-migrate')) as { 'x-colo': Record<string, number> })['x-colo'];
  t.diagnostic(JSON.stringify(counters));
  assert.ok(counters['checkpoints-sent-from-ram']! >= 2, `checkpoints of more than ${limits.coloCheckpointCopyBytesMax} bytes of disk blocks are sent from the disk (${JSON.stringify(counters)})`);
  assert.equal(counters['checkpoints-copied'], 0, `none is copied (${JSON.stringify(counters)})`);
  assert.ok(counters['mean-checkpoint-bytes']! > limits.coloCheckpointCopyBytesMax, `the checkpoints did carry that much (${JSON.stringify(counters)})`);
  assertNoErrors(src, dst);
});

/** Peak resident bytes of process `pid` since resetPeakRss (VmHWM). */
function peakRssBytes(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  assert.ok(m !== null, `no VmHWM for process ${pid}`);
  return Number(m[1]) * 1024;
}

/** Start the peak (VmHWM) over from the current resident size. */
function resetPeakRss(pid: number): void {
  fs.writeFileSync(`/proc/${pid}/clear_refs`, '5');
}

test('colo: a guest that rewrites a large disk between checkpoints does not make the secondary hold that much of it in memory', async (t) => {
  const env = new TestEnv(t);
  const diskBytes = 384 * 1024 * 1024;
  // Writes its whole disk over and over, 1 MiB per fd_pwrite: a checkpoint interval of a few
  // seconds dirties most of it.
  const [src, dst] = await rewriterPair(t, env, diskBytes);
  // The guest dirties its disk faster than pre-copy sends it: a generous downtime limit lets
  // the initial migration switch over after its first round.
  await Promise.all([src.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': 5000, 'downtime-limit': 600000 }), dst.setMigration({ 'x-colo': true })]);
  const migPort = await dst.listenIncoming();
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  await src.waitMigrationStatus('colo', 60000);
  await dst.waitEvent('RESUME', { timeoutMs: 60000 });
  // From here on only checkpoints: the initial migration's peak does not count.
  const pid = dst.child.pid!;
  resetPeakRss(pid);
  const before = rssBytes(pid);
  for (let i = 0; i < 2; i++) await dst.waitEvent('RESUME', { after: dst.qmp.eventCount, timeoutMs: 60000 });
  const grew = peakRssBytes(pid) - before;
  const counters = ((await src.qmp.execute('query-migrate')) as { 'x-colo': Record<string, number> })['x-colo'];
  const mib = (n: number): string => `${(n / 1048576).toFixed(0)} MiB`;
  t.diagnostic(`secondary peak RSS grew ${mib(grew)} over ${mib(before)}; ${JSON.stringify(counters)}`);
  const bound = limits.coloCheckpointDiskHeldBytesMax;
  assert.ok(counters['mean-checkpoint-bytes']! > 3 * bound, `the checkpoints carried far more than the secondary may hold (${JSON.stringify(counters)})`);
  // What it holds, plus what the main channel may queue unread, plus slack for the collector.
  const allowed = bound + limits.mainChannelQueueBytesMax + 64 * 1024 * 1024;
  assert.ok(grew < allowed, `the secondary's peak RSS grew ${mib(grew)} in checkpoints of ${mib(counters['mean-checkpoint-bytes']!)} (allowed ${mib(allowed)})`);
  assertNoErrors(src, dst);
});
