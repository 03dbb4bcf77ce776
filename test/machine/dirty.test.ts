import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LogDirtyTracker, ShadowDirtyTracker } from '../../src/machine/dirty.js';
import { rng } from '../framework/rng.js';
import { guests, waitFor } from '../framework/harness.js';
import { machineFor } from '../framework/machine.js';

const pageBytes = 4096;


test('property: both trackers report exactly the oracle\'s pages over random writes', () => {
  for (let seed = 1; seed <= 40; seed++) {
    const rand = rng(seed);
    const pages = 64;
    const logBase = pages * pageBytes;
    const ram = new Uint8Array(new SharedArrayBuffer(logBase + pages));
    const ranges = [[0, pages]] as const;
    const log = new LogDirtyTracker(() => ({ ram, logBase, always: [0, 0] }));
    const shadow = new ShadowDirtyTracker(ram.byteLength);
    log.reset(ram, ranges);
    shadow.reset(ram, ranges);
    const target = new Uint8Array(logBase); // what a migration target would hold
    for (let round = 0; round < 20; round++) {
      const written = new Set<number>();
      const writes = Math.floor(rand() * 30);
      for (let w = 0; w < writes; w++) {
        // A store of 1..8 bytes anywhere, possibly straddling a page boundary; sometimes
        // writing the value already there (the log sees it, the shadow must not).
        const len = 1 + Math.floor(rand() * 8);
        const addr = Math.floor(rand() * (logBase - len));
        const same = rand() < 0.2;
        for (let i = 0; i < len; i++) ram[addr + i] = same ? ram[addr + i]! : Math.floor(rand() * 256);
        for (const p of new Set([Math.floor(addr / pageBytes), Math.floor((addr + len - 1) / pageBytes)])) {
          ram[logBase + p] = 1; // what the instrumented store does after writing
          written.add(p);
        }
      }
      const changed = new Set<number>();
      for (let p = 0; p < pages; p++) {
        const a = Buffer.from(ram.buffer, p * pageBytes, pageBytes);
        if (!a.equals(Buffer.from(target.buffer, p * pageBytes, pageBytes))) changed.add(p);
      }
      const fromLog = [...log.collect(ram, ranges)];
      const fromShadow = [...shadow.collect(ram, ranges)];
      assert.deepEqual(fromLog, [...written].sort((a, b) => a - b), `seed ${seed} round ${round}: log tracker`);
      assert.deepEqual(fromShadow, [...changed].sort((a, b) => a - b), `seed ${seed} round ${round}: shadow tracker`);
      for (const p of fromShadow) {
        const data = ram.slice(p * pageBytes, (p + 1) * pageBytes);
        target.set(data, p * pageBytes);
        shadow.noteSent(p, data);
      }
    }
  }
});

test('on a real guest the store log and the shadow compare agree', async (t) => {
  const { m, serialText } = await machineFor(t, guests.memwalk, ['4M'], { storeLog: true });
  await m.cont();
  await waitFor('memwalk to start', () => serialText().includes('B'), 20000);
  await m.pause();
  const log = m.dirtyTracker();
  assert.equal(log.kind, 'log');
  const shadow = new ShadowDirtyTracker(m.ram().byteLength + 64 * 1024 * 1024);
  log.reset(m.ram(), m.statePageRanges());
  shadow.reset(m.ram(), m.statePageRanges());
  const region = /start=0x([0-9a-f]+) size=(\d+)/.exec(serialText())!;
  const first = parseInt(region[1]!, 16) / pageBytes;
  const count = Number(region[2]) / pageBytes;
  for (let i = 0; i < 3; i++) {
    await m.cont();
    await new Promise((r) => setTimeout(r, 20 + i * 30));
    await m.pause();
    const ram = m.ram();
    const fromShadow = new Set(shadow.collect(ram, m.statePageRanges()));
    const fromLog = new Set(log.collect(ram, m.statePageRanges()));
    for (const p of fromShadow) assert.ok(fromLog.has(p), `page ${p} changed but the store log missed it`);
    const walked = [...fromShadow].filter((p) => p >= first && p < first + count).length;
    assert.ok(walked > 0, 'memwalk changed pages of its region');
    t.diagnostic(`interval ${i}: shadow ${fromShadow.size} pages, log ${fromLog.size} pages`);
  }
});

test('a shadow tracker given ranges past its view (the guest grew after the view was taken) compares what the view holds and reports the rest next time', () => {
  const pages = 8;
  const memory = new Uint8Array(new SharedArrayBuffer(pages * pageBytes));
  const shadow = new ShadowDirtyTracker(memory.byteLength);
  const small = memory.subarray(0, 4 * pageBytes); // the view from before the grow
  const ranges = [[0, pages]] as const;
  shadow.reset(small, ranges);
  memory[2 * pageBytes] = 1;
  memory[6 * pageBytes] = 1;
  // Before: a RangeError at the first page past the view, which failed the migration.
  assert.deepEqual([...shadow.collect(small, ranges)], [2], 'the changed page inside the view');
  assert.deepEqual([...shadow.collect(memory, ranges)], [6], 'the changed page past the old view, with a view that has it');
});
