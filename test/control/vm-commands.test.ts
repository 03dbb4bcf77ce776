/**
 * QMP commands of a `colo run` process (control/vm.ts, control/commands.ts) against real
 * processes: stop and the run states it must leave alone.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TestEnv, guests } from '../framework/harness.js';
import { assertAdvancing, assertStill, memwalkPair } from '../migration/helpers.js';

test('stop leaves a migrated-away source in postmigrate: cont and migrate stay refused, the guest never runs again', async (t) => {
  const env = new TestEnv(t);
  const src = await env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '32M'], guestArgs: ['4M'] });
  await src.waitSerial('B', { count: 2 });
  // stop on a running VM pauses it (one STOP); a second stop changes nothing.
  const mark = src.qmp.eventCount;
  await src.qmp.execute('stop');
  assert.equal(await src.status(), 'paused');
  await src.qmp.execute('stop');
  assert.equal(await src.status(), 'paused');
  assert.equal(src.eventsOf('STOP', mark).length, 1);
  await src.qmp.execute('cont');
  await src.waitSerial('B', { count: 2, fromOffset: src.serial().length });

  await src.qmp.execute('migrate', { uri: `file:${env.file('src.state')}` });
  await src.waitMigrationStatus('completed');
  assert.equal(await src.status(), 'postmigrate');
  await assert.rejects(src.qmp.execute('cont'), /the VM cannot run in state postmigrate/);
  // QEMU's stop succeeds on a VM that does not run and leaves its state as it is.
  assert.deepEqual(await src.qmp.execute('stop'), {});
  assert.equal(await src.status(), 'postmigrate');
  await assert.rejects(src.qmp.execute('cont'), /the VM cannot run in state postmigrate/);
  await assert.rejects(src.qmp.execute('migrate', { uri: `file:${env.file('again.state')}` }), /cannot migrate a VM in state postmigrate/);
  await assertStill(src);
  assert.equal(src.eventsOf('RESUME', mark).length, 1, 'the only RESUME is the cont before the migration');
});

test('stop on an --incoming defer VM only clears autostart: it stays inmigrate, cont is refused, and the migrated guest arrives paused', async (t) => {
  const env = new TestEnv(t);
  const { src, dst, port } = await memwalkPair(env, { region: '8M', memory: '32M' });
  const dstMark = dst.qmp.eventCount;
  assert.deepEqual(await dst.qmp.execute('stop'), {});
  assert.equal(await dst.status(), 'inmigrate');
  await assert.rejects(dst.qmp.execute('cont'), /Migration is not finalized yet/);
  assert.equal(dst.serial(), '', 'no fresh guest ran on the destination');

  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  await src.waitMigrationStatus('completed');
  await dst.waitMigrationStatus('completed');
  // As with -S: the guest was running on the source, but the destination waits for cont.
  assert.equal(await dst.status(), 'paused');
  await assertStill(dst);
  assert.equal(dst.eventsOf('RESUME', dstMark).length, 0, 'the destination did not run the guest');
  await dst.qmp.execute('cont');
  await dst.waitEvent('RESUME', { after: dstMark, timeoutMs: 5000 });
  await assertAdvancing(dst);
});
