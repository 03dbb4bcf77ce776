/**
 * A full disk is bad input like any other: a migration to a file on a full filesystem fails
 * with a typed error, removes its partial file, and the VM runs on as if nothing happened.
 * The test mounts a 2 MiB tmpfs (it runs as root, as CI does).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { TestEnv, guests } from '../framework/harness.js';
import { assertAdvancing, statuses } from './helpers.js';

test('a migration to a file on a full filesystem fails with a typed error; the VM runs on, nothing is left behind', async (t) => {
  const env = new TestEnv(t);
  const mnt = await env.tmpfs('small-fs', '2m');
  const src = await env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '64M'], guestArgs: ['16M'] });
  await src.waitSerial('B', { count: 2 });
  const mark = src.qmp.eventCount;
  await src.qmp.execute('migrate', { uri: `file:${mnt}/vm.state` });
  const info = await src.waitMigrationStatus('failed', 30000);
  const desc = String(info['error-desc']);
  t.diagnostic(`error-desc: ${desc}`);
  assert.match(desc, /no space left on device/i);
  assert.match(desc, /FILE_WRITE/);
  assert.deepEqual(fs.readdirSync(mnt), [], 'the partial state file is removed');
  assert.deepEqual(statuses(src, mark), ['setup', 'active', 'device', 'failed']);
  assert.equal(await src.status(), 'running');
  await assertAdvancing(src);

  // The same VM then saves to a filesystem with room.
  const good = env.file('vm.state');
  await src.qmp.execute('migrate', { uri: `file:${good}` });
  await src.waitMigrationStatus('completed', 30000);
  assert.ok(fs.statSync(good).size > 16 * 1024 * 1024, 'the state file holds the 16 MiB region');
  assert.deepEqual(src.errorLines(), [], 'a full disk is reported to the caller, not logged as an error');
});
