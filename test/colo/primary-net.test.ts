/**
 * PrimaryNet (colo/network.ts) alone, with a stand-in for the VM's front end: the PVM's output
 * held for a checkpoint in flight is bounded by stopping client input, not by memory.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PrimaryNet } from '../../src/colo/network.js';
import { limits } from '../../src/core/limits.js';
import type { Vm } from '../../src/control/vm.js';
import type { SourceSession } from '../../src/migration/session.js';
import type { NicOutput } from '../../src/net/nic.js';

/** What PrimaryNet touches of a Vm: the output sink, the input tap and the front end. */
function standIn(): { vm: Vm; calls: string[]; delivered: NicOutput[] } {
  const calls: string[] = [];
  const delivered: NicOutput[] = [];
  const frontEnd = {
    deliver: (out: NicOutput) => delivered.push(out),
    deliveredBytes: () => 0,
    pauseReading: () => calls.push('pauseReading'),
    resumeReading: () => calls.push('resumeReading'),
  };
  const vm = { frontEnd, outputSink: null, inputTap: null } as unknown as Vm;
  return { vm, calls, delivered };
}

test('colo net: PVM output for the next epoch past the held limit stops client input until the checkpoint is received', (t) => {
  const { vm, calls, delivered } = standIn();
  const net = new PrimaryNet(vm, {} as SourceSession, () => undefined, () => undefined);
  net.start();
  t.after(() => net.stop());
  const sink = (vm as unknown as { outputSink: (o: NicOutput) => void }).outputSink;
  sink({ kind: 'out', conn: 1, offset: 0, bytes: new Uint8Array(10) });
  net.pvmNextEpoch();
  const half = Math.floor(limits.coloCompareHeldBytesMax / 2);
  sink({ kind: 'out', conn: 1, offset: 10, bytes: new Uint8Array(half) });
  assert.deepEqual(calls, [], 'below the limit: clients are read');
  sink({ kind: 'out', conn: 1, offset: 10 + half, bytes: new Uint8Array(half + 1) });
  assert.deepEqual(calls, ['pauseReading'], 'past the limit: client input stops');
  sink({ kind: 'out', conn: 1, offset: 11 + 2 * half, bytes: new Uint8Array(1) });
  assert.deepEqual(calls, ['pauseReading'], 'once');
  assert.equal(delivered.length, 0, 'nothing released before the checkpoint is received');
  // VMSTATE_RECEIVED: the old epoch's output goes out, the next epoch's waits for the SVM, and
  // the clients are read again.
  net.checkpoint();
  assert.deepEqual(calls, ['pauseReading', 'resumeReading']);
  assert.deepEqual(delivered.map((o) => (o.kind === 'out' ? [o.offset, o.bytes.byteLength] : o.kind)), [[0, 10]]);
  // A failover releases the rest, in order.
  net.stop();
  assert.deepEqual(delivered.map((o) => (o.kind === 'out' ? o.offset : -1)), [0, 10, 10 + half, 11 + 2 * half]);
});
