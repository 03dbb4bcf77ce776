/**
 * The secondary's disk blocks of a checkpoint in flight (CheckpointBlocks): held in memory up
 * to a bound, staged in a file beyond it, all written by the apply and none by a drop.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CheckpointBlocks } from '../../src/colo/checkpoint-blocks.js';
import { limits } from '../../src/core/limits.js';
import { MigrationError } from '../../src/core/errors.js';

const bb = limits.diskBlockBytes;

function block(fill: number): Uint8Array {
  return new Uint8Array(bb).fill(fill);
}

/** What a sink was given: block -> fill byte of its data (0 for a zero block), in order. */
function recorder(): { seen: [number, number][]; write: (b: number, d: Uint8Array | null) => void } {
  const seen: [number, number][] = [];
  return {
    seen,
    write: (b, d) => {
      if (d !== null) assert.ok(d.every((x) => x === d[0]), `block ${b} holds one fill byte`);
      seen.push([b, d === null ? 0 : d[0]!]);
    },
  };
}

test('checkpoint blocks: past the memory bound they are staged, and the apply writes every block once with its last content', () => {
  const blocks = new CheckpointBlocks(100, 4 * bb);
  // Blocks 0-3 fill memory; the rest are staged (data and zero blocks).
  for (let b = 0; b < 10; b++) blocks.put(b, b % 3 === 2 ? null : block(b + 1));
  assert.equal(blocks.count, 10);
  assert.equal(blocks.stagedBlocks, 6, 'four blocks held, six staged');
  // Later copies replace earlier ones, where each block is: memory or staging file.
  blocks.put(1, null);
  blocks.put(7, block(0x77));
  blocks.put(8, null);
  blocks.put(5, block(0x55));
  assert.equal(blocks.count, 10, 'a block sent again is not counted twice');
  // A source buffer reused after put (as a frame's is) does not change what was put.
  const reused = block(0x99);
  blocks.put(99, reused);
  reused.fill(0x11);

  const r = recorder();
  blocks.apply(r.write);
  const got = new Map(r.seen);
  assert.equal(r.seen.length, got.size, 'each block is written once');
  assert.deepEqual([...got.entries()].sort((a, b) => a[0] - b[0]), [
    [0, 1], [1, 0], [2, 0], [3, 4], [4, 5], [5, 0x55], [6, 7], [7, 0x77], [8, 0], [9, 10], [99, 0x99],
  ]);
  assert.equal(blocks.count, 0, 'the apply empties it');
  assert.equal(blocks.stagedBlocks, 0);

  // The next checkpoint starts from nothing: no block of the last one is written again.
  blocks.put(42, block(0x42));
  for (let b = 50; b < 60; b++) blocks.put(b, block(b));
  const r2 = recorder();
  blocks.apply(r2.write);
  assert.deepEqual(r2.seen.map(([b]) => b).sort((a, b) => a - b), [42, ...Array.from({ length: 10 }, (_, i) => 50 + i)]);
  assert.equal(new Map(r2.seen).get(57), 57, 'a staged block reads back what was staged');
  blocks.close();
});

test('checkpoint blocks: a dropped checkpoint (failover) leaves nothing for the next apply, staged or held', () => {
  const blocks = new CheckpointBlocks(64, 2 * bb);
  for (let b = 0; b < 8; b++) blocks.put(b, block(b + 1));
  assert.equal(blocks.stagedBlocks, 6);
  blocks.clear();
  assert.equal(blocks.count, 0);
  blocks.put(3, block(0x33));
  const r = recorder();
  blocks.apply(r.write);
  assert.deepEqual(r.seen, [[3, 0x33]]);
  blocks.close();
});

test('checkpoint blocks: a write the apply could not make still empties it (the checkpoint is abandoned)', () => {
  const blocks = new CheckpointBlocks(16, bb);
  for (let b = 0; b < 4; b++) blocks.put(b, block(b + 1));
  assert.throws(() => blocks.apply(() => {
    throw new Error('disk full');
  }), /disk full/);
  assert.equal(blocks.count, 0);
  blocks.close();
});

test('checkpoint blocks: a staging file that cannot be made is a typed error naming $TMPDIR, and the blocks held so far stay', (t) => {
  const saved = process.env.TMPDIR;
  t.after(() => {
    if (saved === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = saved;
  });
  process.env.TMPDIR = '/nonexistent-colo-tmpdir';
  const blocks = new CheckpointBlocks(16, bb);
  blocks.put(0, block(1));
  assert.throws(() => blocks.put(1, block(2)), (err: unknown) => {
    assert.ok(err instanceof MigrationError);
    assert.equal(err.code, 'DISK_IO');
    assert.match(err.message, /cannot make the staging file for the checkpoint's disk blocks in \/nonexistent-colo-tmpdir \(TMPDIR\): ENOENT/);
    return true;
  });
  assert.equal(blocks.count, 1);
  blocks.close();
});

test('checkpoint blocks: a block held in memory is a copy of the frame\'s buffer; a staged block sent again as zero is applied as zero', () => {
  const blocks = new CheckpointBlocks(16, 2 * bb);
  // The receive loop reuses its buffer for the next frame before the apply.
  const frame = block(0x21);
  blocks.put(0, frame);
  frame.fill(0x22);
  blocks.put(1, frame);
  frame.fill(0x23);
  // Staged with data, then zeroed by the guest before the checkpoint was sent: its file copy is stale.
  blocks.put(2, block(0x24));
  blocks.put(2, null);
  assert.equal(blocks.stagedBlocks, 1);
  const r = recorder();
  blocks.apply(r.write);
  assert.deepEqual([...new Map(r.seen).entries()].sort((a, b) => a[0] - b[0]), [[0, 0x21], [1, 0x22], [2, 0]]);
  blocks.close();
});
