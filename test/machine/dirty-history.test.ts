/**
 * The store log's history (what a migration uses to send never-written pages unread):
 * against an oracle of random writes, a page is reported never written exactly when no write
 * ever touched it since boot, whatever collects and resets happened in between.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LogDirtyTracker, ShadowDirtyTracker } from '../../src/machine/dirty.js';
import { rng } from '../framework/rng.js';

const pageBytes = 4096;


test('property: neverWritten and writtenMap match an oracle of every write since boot', () => {
  for (let seed = 1; seed <= 30; seed++) {
    const rand = rng(seed);
    const pages = 9000; // more than one 4096-byte stretch of the map
    const logBase = pages * pageBytes;
    const ram = new Uint8Array(new SharedArrayBuffer(logBase + pages));
    const always: [number, number] = [100, 116];
    const log = new LogDirtyTracker(() => ({ ram, logBase, always }), undefined, { sinceBoot: true, pagesMax: pages });
    const ranges = [[0, pages]] as const;
    const ever = new Set<number>();
    for (let step = 0; step < 12; step++) {
      const writes = Math.floor(rand() * 40);
      for (let w = 0; w < writes; w++) {
        // Clustered or scattered pages, as guests write.
        const p = rand() < 0.5 ? Math.floor(rand() * 64) + 4000 : Math.floor(rand() * pages);
        ram[logBase + p] = 1;
        ever.add(p);
      }
      const op = rand();
      if (op < 0.4) log.collect(ram, ranges);
      else if (op < 0.6) log.beginFullSend(ram, ranges);
      const map = log.writtenMap()!;
      // Marks not yet collected are not history yet: collect so that the oracle compares.
      log.collect(ram, ranges);
      for (let p = 0; p < pages; p++) {
        const inAlways = p >= always[0] && p < always[1];
        const expectNever = !ever.has(p) && !inAlways;
        if (log.neverWritten(p) !== expectNever) assert.fail(`seed ${seed} step ${step}: page ${p} neverWritten=${log.neverWritten(p)}, oracle ${expectNever}`);
        if ((map[p] === 0) !== expectNever) assert.fail(`seed ${seed} step ${step}: page ${p} map=${map[p]}, oracle never-written ${expectNever}`);
      }
    }
    log.forgetHistory();
    assert.equal(log.writtenMap(), null);
    assert.equal(log.neverWritten(0), false);
  }
});

test('a shadow tracker knows no history; a log tracker without sinceBoot neither', () => {
  const shadow = new ShadowDirtyTracker(16 * pageBytes);
  assert.equal(shadow.writtenMap(), null);
  assert.equal(shadow.neverWritten(3), false);
  const ram = new Uint8Array(new SharedArrayBuffer(16 * pageBytes + 16));
  const log = new LogDirtyTracker(() => ({ ram, logBase: 16 * pageBytes, always: [0, 0] }));
  assert.equal(log.writtenMap(), null);
  assert.equal(log.neverWritten(3), false);
});

test('noteSent(page, null) leaves an untouched shadow page alone and clears a written one', () => {
  const shadow = new ShadowDirtyTracker(4 * pageBytes);
  const view = Buffer.from(shadow.shadow);
  view.fill(7, pageBytes, 2 * pageBytes);
  shadow.noteSent(0, null);
  shadow.noteSent(1, null);
  assert.ok(view.subarray(0, 2 * pageBytes).every((b) => b === 0));
});
