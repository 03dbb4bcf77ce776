/**
 * PrimaryNet (colo/network.ts) alone, with a stand-in for the VM's front end: output held for
 * the compare (for a checkpoint in flight, or for the other guest) is bounded by stopping
 * client input, not by memory.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { PrimaryNet } from '../../src/colo/network.js';
import { limits } from '../../src/core/limits.js';
import type { Vm } from '../../src/control/vm.js';
import type { SourceSession } from '../../src/migration/session.js';
import type { NicInput, NicOutput } from '../../src/net/nic.js';
import { decodeNetBatch, encodeOutputs } from '../../src/colo/net-wire.js';
import type { Frame } from '../../src/migration/stream.js';

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

/** A started PrimaryNet on a stand-in VM: the PVM's output sink and SVM output of an epoch, as on the main channel. */
function startedNet(t: TestContext): { net: PrimaryNet; calls: string[]; delivered: NicOutput[]; pvm: (o: NicOutput) => void; svm: (epoch: number, o: NicOutput) => void } {
  const { vm, calls, delivered } = standIn();
  const net = new PrimaryNet(vm, {} as SourceSession, () => undefined, () => undefined);
  net.start();
  t.after(() => net.stop());
  const pvm = (vm as unknown as { outputSink: (o: NicOutput) => void }).outputSink;
  const svm = (epoch: number, o: NicOutput): void => {
    for (const payload of encodeOutputs(epoch, [o])) net.onFrame({ payload } as Frame);
  };
  return { net, calls, delivered, pvm, svm };
}

test('colo net: PVM output for the next epoch past the held limit stops client input until the checkpoint is received', (t) => {
  const { net, calls, delivered, pvm: sink, svm } = startedNet(t);
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
  // VMSTATE_RECEIVED: the old epoch's output goes out, the next epoch's now waits for the SVM's
  // copy, and still holds more than half the limit: clients are read again once that came.
  net.checkpoint();
  assert.deepEqual(calls, ['pauseReading']);
  assert.deepEqual(delivered.map((o) => (o.kind === 'out' ? [o.offset, o.bytes.byteLength] : o.kind)), [[0, 10]]);
  svm(1, { kind: 'out', conn: 1, offset: 10, bytes: new Uint8Array(half + 1) });
  assert.deepEqual(calls, ['pauseReading'], "the SVM's copy of all but half + 1 of it");
  svm(1, { kind: 'out', conn: 1, offset: 11 + half, bytes: new Uint8Array(1) });
  assert.deepEqual(calls, ['pauseReading', 'resumeReading'], 'half held: read again');
  assert.deepEqual(delivered.map((o) => (o.kind === 'out' ? [o.offset, o.bytes.byteLength] : o.kind)), [[0, 10], [10, half], [10 + half, 1], [11 + half, 1]]);
  // A failover releases the rest, in order.
  net.stop();
  assert.deepEqual(delivered.map((o) => (o.kind === 'out' ? o.offset : -1)), [0, 10, 10 + half, 11 + half, 12 + half, 11 + 2 * half]);
});

test('colo net: output held for the other guest past the limit stops client input; matching output that brings it to half resumes it', (t) => {
  const { calls, delivered, pvm: sink, svm } = startedNet(t);
  const limit = limits.coloCompareHeldBytesMax;
  // The SVM runs ahead of a PVM that produces nothing (stopped, say): its output piles up.
  svm(0, { kind: 'out', conn: 1, offset: 0, bytes: new Uint8Array(limit / 2) });
  assert.deepEqual(calls, []);
  svm(0, { kind: 'out', conn: 1, offset: limit / 2, bytes: new Uint8Array(limit / 2 + 1) });
  assert.deepEqual(calls, ['pauseReading'], 'past the limit: client input stops');
  // The PVM catches up: what matches is released, and below half the clients are read again.
  sink({ kind: 'out', conn: 1, offset: 0, bytes: new Uint8Array(limit / 4) });
  assert.deepEqual(calls, ['pauseReading'], 'still above half');
  sink({ kind: 'out', conn: 1, offset: limit / 4, bytes: new Uint8Array(limit / 4) });
  assert.deepEqual(calls, ['pauseReading'], 'one byte above half');
  sink({ kind: 'out', conn: 1, offset: limit / 2, bytes: new Uint8Array(1) });
  assert.deepEqual(calls, ['pauseReading', 'resumeReading'], 'at half: read again');
  assert.equal(delivered.reduce((n, o) => n + (o.kind === 'out' ? o.bytes.byteLength : 0), 0), limit / 2 + 1, 'what matched went to the client');
});

test('colo net: input numbered since the initial migration paused the PVM (a client connecting or resetting meanwhile) is mirrored first at COLO start', async (t) => {
  const { vm } = standIn();
  const backlog: NicInput[] = [
    { seq: 7, kind: 'open', conn: 3 },
    { seq: 8, kind: 'close', conn: 3 },
  ];
  (vm as unknown as { inputBacklog: NicInput[] | null }).inputBacklog = backlog;
  const sent: Buffer[] = [];
  const net = new PrimaryNet(vm, { sendColoNet: (p: Buffer) => sent.push(Buffer.from(p)) } as unknown as SourceSession, () => undefined, () => undefined);
  net.start();
  t.after(() => net.stop());
  (vm as unknown as { inputTap: (ev: NicInput) => void }).inputTap({ seq: 9, kind: 'open', conn: 4 });
  await new Promise((resolve) => setImmediate(resolve));
  const mirrored = sent.flatMap((p) => {
    const b = decodeNetBatch(p);
    return b.type === 'input' ? b.events.map((e) => e.seq) : [];
  });
  assert.deepEqual(mirrored, [7, 8, 9], 'the backlog, then the live input, in order');
  assert.equal((vm as unknown as { inputBacklog: unknown }).inputBacklog, null, 'the backlog is taken once');
});
