/**
 * Migrations that end early: cancel, the destination killed, the source killed, a yank. In
 * every case the source guest keeps running and the destination never runs a half-loaded
 * guest. The migrations are slowed with max-bandwidth so that they are surely in flight.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TestEnv, sleep } from '../framework/harness.js';
import { assertAdvancing, assertNoErrors, memwalkPair, statuses } from './helpers.js';

const slow = { 'max-bandwidth': 8 * 1024 * 1024 };

for (const multifd of [false, true]) {
  const mode = multifd ? 'multifd' : 'plain';
  test(`cancel in mid-migration (${mode}): cancelling → cancelled, the source runs on, the target exits`, async (t) => {
    const env = new TestEnv(t);
    const { src, dst, port } = await memwalkPair(env, { capabilities: { multifd }, parameters: slow });
    const mark = src.qmp.eventCount;
    const dstMark = dst.qmp.eventCount;
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    await src.waitEvent('MIGRATION', { after: mark, where: (e) => e.data.status === 'active' });
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
}

test('the destination killed mid-migration: the source reports failed and runs on', async (t) => {
  const env = new TestEnv(t);
  const { src, dst, port } = await memwalkPair(env, { capabilities: { multifd: true }, parameters: slow });
  const mark = src.qmp.eventCount;
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  await src.waitEvent('MIGRATION', { after: mark, where: (e) => e.data.status === 'active' });
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
  const mark = src.qmp.eventCount;
  const dstMark = dst.qmp.eventCount;
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  await src.waitEvent('MIGRATION', { after: mark, where: (e) => e.data.status === 'active' });
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

test('yank on the source mid-migration: failed, the source runs on', async (t) => {
  const env = new TestEnv(t);
  const { src, dst, port } = await memwalkPair(env, { parameters: slow });
  const mark = src.qmp.eventCount;
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  await src.waitEvent('MIGRATION', { after: mark, where: (e) => e.data.status === 'active' });
  await src.yankMigration();
  const info = await src.waitMigrationStatus('failed', 10000);
  assert.match(String(info['error-desc']), /yanked/);
  assert.equal(await src.status(), 'running');
  await assertAdvancing(src);
  assert.equal(await dst.waitExit(10000), 1);
  assertNoErrors(src);
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
