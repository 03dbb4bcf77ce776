/**
 * A migration whose destination goes silent (no FIN, no RST): one multifd channel stalled by a
 * proxy, or the destination process frozen (SIGSTOP). What a QEMU user expects: migrate_cancel
 * and yank end it at once, the source runs on, and a migration to a fresh destination then
 * succeeds.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TestEnv, guests, sleep, type VmProcess } from '../framework/harness.js';
import { ChannelProxy } from '../framework/channel-proxy.js';
import { limits } from '../../src/core/limits.js';
import { assertAdvancing, assertNoErrors, memwalkPair, migrateUntilActive, statuses } from './helpers.js';

const slow = { 'max-bandwidth': 8 * 1024 * 1024 };

/** A fresh destination, migrated to directly: the migration completes and the memory is whole. */
async function migratesToFreshDestination(env: TestEnv, src: VmProcess, region: { start: number; size: number }, capabilities: Record<string, boolean>): Promise<void> {
  const dst2 = await env.startVm({ name: 'dst2', guest: guests.memwalk, args: ['--memory', '96M', '--incoming', 'defer'], guestArgs: ['32M'] });
  await dst2.setMigration(capabilities, { 'max-bandwidth': 0 });
  await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
  const mark = src.qmp.eventCount;
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${await dst2.listenIncoming()}` });
  await src.waitMigrationStatus('completed', 60000);
  assert.deepEqual(statuses(src, mark).at(-1), 'completed');
  await dst2.waitMigrationStatus('completed', 10000);
  await dst2.waitEvent('RESUME', { timeoutMs: 10000 });
  await assertAdvancing(dst2, 1, 30000);
  assert.equal(await dst2.memwalkCheck(region), null, 'the fresh destination holds the memwalk pattern');
  assertNoErrors(dst2);
}

for (const how of ['migrate_cancel', 'yank'] as const) {
  test(`silent/multifd: one multifd channel stalls (open, forwarding nothing) mid-migration: ${how} ends it at once, the source runs on, and a migration to a fresh destination succeeds`, async (t) => {
    const env = new TestEnv(t);
    const capabilities = { multifd: true };
    const { src, dst, port, region } = await memwalkPair(env, { capabilities, parameters: { ...slow, 'multifd-channels': 4 } });
    const proxy = await ChannelProxy.start(port);
    env.onCleanup(() => proxy.close());
    const { mark, dstMark } = await migrateUntilActive(src, proxy.port, dst);
    await proxy.established('multifd1');
    proxy.stall('multifd1');
    await sleep(1500);
    assert.equal(await src.migrationStatus(), 'active', 'the migration waits on the stalled channel');
    const at = performance.now();
    if (how === 'yank') await src.yankMigration();
    else await src.qmp.execute('migrate_cancel');
    const want = how === 'yank' ? 'failed' : 'cancelled';
    await src.waitMigrationStatus(want, 5000);
    t.diagnostic(`${want} ${Math.round(performance.now() - at)} ms after ${how}`);
    assert.deepEqual(statuses(src, mark), ['setup', 'active', ...(how === 'yank' ? [] : ['cancelling']), want]);
    assert.equal(await src.status(), 'running');
    await assertAdvancing(src);
    // The destination learns of the end through its other channels (the stalled one never closes).
    assert.equal(await dst.waitExit(15000), 1, 'the destination exits non-zero');
    assert.equal(dst.eventsOf('RESUME', dstMark).length, 0, 'the destination never ran');
    if (how === 'migrate_cancel') assert.match(dst.stderr, / info migration: incoming migration cancelled/);
    assertNoErrors(src);
    if (how === 'migrate_cancel') assertNoErrors(dst);
    await migratesToFreshDestination(env, src, region, capabilities);
    assertNoErrors(src);
  });
}

for (const multifd of [false, true]) {
  test(`silent/frozen (${multifd ? 'multifd' : 'plain'}): a destination frozen (SIGSTOP) before it answers the setup: migrate_cancel ends it at once, a migration to a fresh destination succeeds, and quit is prompt`, async (t) => {
    const env = new TestEnv(t);
    const capabilities = { multifd };
    const { src, dst, port, region } = await memwalkPair(env, { capabilities });
    dst.kill('SIGSTOP');
    env.onCleanup(() => dst.kill('SIGCONT'));
    const mark = src.qmp.eventCount;
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    await sleep(1000);
    assert.equal(await src.migrationStatus(), 'setup', 'the source waits for the frozen destination\'s answer');
    await src.qmp.execute('migrate_cancel');
    await src.waitMigrationStatus('cancelled', 5000);
    assert.deepEqual(statuses(src, mark), ['setup', 'cancelling', 'cancelled']);
    assert.equal(await src.status(), 'running');
    await assertAdvancing(src);
    await migratesToFreshDestination(env, src, region, capabilities);
    const quitAt = performance.now();
    await src.qmp.execute('quit');
    assert.equal(await src.waitExit(5000), 0, 'the source exits');
    const ms = performance.now() - quitAt;
    t.diagnostic(`exited ${Math.round(ms)} ms after quit`);
    assert.ok(ms < 2000, `the source exits promptly after quit, not held by the frozen destination's handshake (took ${Math.round(ms)} ms)`);
    assertNoErrors(src);
  });
}

test('silent/source frozen (SIGSTOP) mid-migration: yank on the destination ends its incoming migration at once; it never runs the half-loaded guest', async (t) => {
  const env = new TestEnv(t);
  const { src, dst, port } = await memwalkPair(env, { capabilities: { multifd: true }, parameters: slow });
  const { dstMark } = await migrateUntilActive(src, port, dst);
  src.kill('SIGSTOP');
  env.onCleanup(() => src.kill('SIGCONT'));
  await sleep(1000);
  assert.equal(await dst.migrationStatus(), 'active', 'the destination waits for the frozen source');
  await dst.yankMigration();
  assert.equal(await dst.waitExit(10000), 1, 'the destination ends its migration and exits non-zero');
  assert.ok(dst.eventsOf('MIGRATION', dstMark).some((e) => e.data.status === 'failed'), `statuses: ${dst.eventsOf('MIGRATION', dstMark).map((e) => String(e.data.status)).join(', ')}`);
  assert.equal(dst.eventsOf('RESUME', dstMark).length, 0, 'the destination never ran');
  src.kill('SIGCONT');
  // The source learns of the end when it runs again, and runs on.
  await src.waitMigrationStatus('failed', 15000);
  assert.equal(await src.status(), 'running');
  await assertAdvancing(src);
  assertNoErrors(src);
});

for (const link of ['multifd1', 'main'] as const) {
  test(`silent/stall (${link}): the ${link} channel stalls mid-migration and nobody cancels: the migration fails on its own within limits.migrationStallMs (MIGRATION_STALLED, one warning), the source runs on${link === 'multifd1' ? ', and a migration to a fresh destination succeeds' : ''}`, async (t) => {
    const env = new TestEnv(t);
    const capabilities = { multifd: link !== 'main' };
    const { src, dst, port, region } = await memwalkPair(env, { capabilities, parameters: { ...slow, 'multifd-channels': 4 } });
    const proxy = await ChannelProxy.start(port);
    env.onCleanup(() => proxy.close());
    const { mark, dstMark } = await migrateUntilActive(src, proxy.port, dst);
    await proxy.established(link);
    proxy.stall(link);
    const at = performance.now();
    await src.waitMigrationStatus('failed', limits.migrationStallMs + 15000);
    const tookMs = performance.now() - at;
    t.diagnostic(`failed ${Math.round(tookMs)} ms after the stall`);
    assert.ok(tookMs >= limits.migrationStallMs - 1000, `not given up before the bound (${Math.round(tookMs)} ms)`);
    assert.deepEqual(statuses(src, mark), ['setup', 'active', 'failed']);
    const info = await src.qmp.execute<Record<string, unknown>>('query-migrate');
    assert.match(String(info['error-desc']), /stalled.*\[MIGRATION_STALLED\]/);
    assert.equal(await src.status(), 'running');
    await assertAdvancing(src);
    const warnings = src.stderr.split('\n').filter((l) => / warn /.test(l));
    assert.equal(warnings.length, 1, `one warning line:\n${src.stderr}`);
    assert.match(warnings[0]!, /migration failed: .*stalled/);
    assertNoErrors(src);
    assert.equal(dst.eventsOf('RESUME', dstMark).length, 0, 'the destination never ran');
    if (link === 'multifd1') await migratesToFreshDestination(env, src, region, capabilities);
  });
}

test('silent/stall: a migration throttled so low that one paced packet waits longer than limits.migrationStallMs is slow, not stalled: it stays active, and completes once max-bandwidth is lifted', async (t) => {
  const env = new TestEnv(t);
  const capabilities = { multifd: true };
  // 4 channels of 16 KiB/s each: a channel waits 32 s after each 512 KiB packet.
  const bandwidth = 64 * 1024;
  const { src, dst, port, region } = await memwalkPair(env, { capabilities, parameters: { 'max-bandwidth': bandwidth, 'multifd-channels': 4 } });
  const { mark } = await migrateUntilActive(src, port, dst);
  await sleep(limits.migrationStallMs + 5000);
  assert.deepEqual(statuses(src, mark), ['setup', 'active'], 'the slow migration is still active');
  await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
  await src.waitMigrationStatus('completed', 60000);
  await dst.waitEvent('RESUME', { timeoutMs: 10000 });
  await assertAdvancing(dst, 1, 30000);
  assert.equal(await dst.memwalkCheck(region), null, 'the destination holds the memwalk pattern');
  assertNoErrors(src, dst);
});
