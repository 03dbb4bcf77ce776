/**
 * The destination's disk mode (migration/disk-sync.ts): the disk travels unless both ends
 * open the same file, and the same device and inode numbers name the same file only on one
 * boot of one host.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TestEnv } from '../framework/harness.js';
import { Disk } from '../../src/block/disk.js';
import { chooseDiskMode, diskIdentity, DiskSender } from '../../src/migration/disk-sync.js';
import type { MainChannel } from '../../src/migration/channel.js';
import { FrameType } from '../../src/migration/stream.js';
import { limits } from '../../src/core/limits.js';

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

test('regression: zero disk blocks go to the destination as they are read, not in one frame per 16384 (the destination lagged a whole frame behind)', async (t) => {
  // A mostly empty drive: the source reads every block and sends the zero ones as numbers.
  // They went in frames of up to 16384 (64 MiB of disk): the destination, which checks each
  // block of its own disk, started on a frame only when the source had read all of it, and
  // was still at it when the source paused the VM. A 512 MiB drive: ~900 ms of downtime for a
  // rest of 16 zero pages (300 ms limit). Now no block waits for more than a batch of reads.
  const env = new TestEnv(t);
  const disk = Disk.open(env.image('zero.img', 8 << 20), { snapshot: false });
  env.onCleanup(() => disk.close());
  let reads = 0;
  const readBlock = disk.readBlock.bind(disk);
  disk.readBlock = (block, into) => {
    reads++;
    readBlock(block, into);
  };
  let sent = 0;
  let lagMax = 0;
  const channel = {
    bytesSent: 0,
    sendFrame(type: number, parts: Uint8Array[]): void {
      assert.equal(type, FrameType.diskZero);
      lagMax = Math.max(lagMax, reads - sent);
      sent += Buffer.from(parts[0]!.buffer, parts[0]!.byteOffset, 4).readUInt32BE(0);
    },
    drain: () => Promise.resolve(),
  } as unknown as MainChannel;
  const sender = new DiskSender(disk, 'full');
  const blocks = sender.firstRound();
  assert.equal(await sender.send(channel, blocks), 2048);
  assert.equal(sent, 2048, 'every block was sent');
  assert.ok(lagMax <= limits.diskReadBlocksMax, `a zero block waited unsent while ${lagMax} blocks were read`);
});
