/**
 * The destination's disk mode (migration/disk-sync.ts): the disk travels unless both ends
 * open the same file, and the same device and inode numbers name the same file only on one
 * boot of one host.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TestEnv } from '../framework/harness.js';
import { Disk } from '../../src/block/disk.js';
import { chooseDiskMode, diskIdentity } from '../../src/migration/disk-sync.js';

test('disk mode: shared only for the same file on the same boot of this host; overlay when the source writes a snapshot; full otherwise', (t) => {
  const env = new TestEnv(t);
  const a = Disk.open(env.image('a.img', 1 << 20), { snapshot: false });
  const b = Disk.open(env.image('b.img', 1 << 20), { snapshot: false });
  env.onCleanup(() => {
    a.close();
    b.close();
  });
  const id = diskIdentity(a);
  assert.match(id.host, /^(boot|host):./);
  assert.equal(chooseDiskMode(id, a), 'shared');
  assert.equal(chooseDiskMode({ ...id, snapshot: true }, a), 'overlay');
  assert.equal(chooseDiskMode(id, b), 'full', 'another file on this host');
  assert.equal(chooseDiskMode({ ...id, host: 'boot:00000000-0000-0000-0000-000000000000' }, a), 'full', 'a file with the same numbers on another host');
  const { host: _host, ...older } = id;
  assert.equal(chooseDiskMode(older, a), 'full', 'a source that does not say which host it is on');
  assert.equal(chooseDiskMode(null, a), 'full');
  assert.equal(chooseDiskMode(id, null), 'none');
});
