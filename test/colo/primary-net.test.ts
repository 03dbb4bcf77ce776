/**
 * PrimaryNet (colo/network.ts) alone, with a stand-in for the VM's front end: output held for
 * the compare (for a checkpoint in flight, or for the other guest) is bounded by stopping
 * client input, not by memory. And PrimaryNet with SecondaryNet over a real SVM output channel
 * (the secondary's vCPU played by the test): the channel breaking costs no mismatch.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { PrimaryNet } from '../../src/colo/network.js';
import { limits } from '../../src/core/limits.js';
import type { Vm } from '../../src/control/vm.js';
import type { SourceSession } from '../../src/migration/session.js';
import type { NicInput, NicOutput } from '../../src/net/nic.js';
import { decodeNetBatch, encodeMirrorReady, encodeOutputFrames, encodeOutputs } from '../../src/colo/net-wire.js';
import type { Frame } from '../../src/migration/stream.js';
import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import { SecondaryNet } from '../../src/colo/network.js';
import { OutputListener } from '../../src/colo/output-channel.js';
import type { IncomingSession } from '../../src/migration/session.js';
import { waitFor, withTimeout } from '../framework/harness.js';

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

/**
 * PrimaryNet and SecondaryNet with a real SVM output channel between them; the test plays the
 * secondary's vCPU (it holds the channel's socket and says when it broke) and the main channel
 * (in order, straight from one to the other). PVM output 'Z' then 'A' waits for the SVM's.
 */
async function pairWithChannel(t: TestContext): Promise<{
  primary: PrimaryNet;
  /** The secondary's vCPU end of the output channel. */
  ch: Socket;
  triggers: string[];
  delivered: NicOutput[];
  /** The vCPU gave up the channel: 'direct-output-failed', then its output goes to the main thread. */
  channelBroke(): void;
  pvmOutput(o: NicOutput): void;
  svmOutput(o: NicOutput): void;
  /** SVM output events that went on the main channel. */
  mainOutputs(): number;
  /** The secondary's machine was told to stop using the output channel (stopDirectOutput). */
  directStops(): number;
}> {
  const id = new Uint8Array(16).fill(5);
  const triggers: string[] = [];
  const { vm: pvmVm, delivered } = standIn();
  let toSecondary: (p: Uint8Array) => void = () => undefined;
  const primarySession = { opts: { host: '127.0.0.1' }, migrationId: id, sendColoNet: (p: Uint8Array) => toSecondary(p) };
  const primary = new PrimaryNet(pvmVm, primarySession as unknown as SourceSession, (reason) => triggers.push(reason), (err) => triggers.push(`broken: ${err.message}`));
  primary.start();
  t.after(() => primary.stop());
  const vcpu: { listener: OutputListener | null } = { listener: null };
  const machine = Object.assign(new EventEmitter(), {
    setOutputEpoch: () => undefined,
    stopDirectOutput: () => void directStops++,
    openOutputChannel: async (host: string, migrationId: Uint8Array) => {
      vcpu.listener = await OutputListener.open(host, migrationId);
      return vcpu.listener.port;
    },
  });
  const svmVm = { machine, outputSink: null as ((o: NicOutput) => void) | null } as unknown as Vm;
  let mainOutputs = 0;
  let directStops = 0;
  const secondary = new SecondaryNet(svmVm, {
    migrationId: id,
    localHost: '127.0.0.1',
    sendColoNet: (p: Uint8Array) => {
      const b = decodeNetBatch(Buffer.from(p));
      if (b.type === 'output') mainOutputs += b.events.length;
      primary.onFrame({ payload: Buffer.from(p) } as Frame);
    },
  } as unknown as IncomingSession);
  toSecondary = (p) => secondary.onFrame({ payload: Buffer.from(p) } as Frame);
  t.after(() => secondary.stop());
  const port = await secondary.start();
  const listener = vcpu.listener;
  assert.ok(port !== null && listener !== null, 'the vCPU listens for the output channel');
  t.after(() => listener.close());
  await primary.openOutputChannel(port);
  const ch: Socket | null = await withTimeout(listener.accepted, 5000, 'the output channel to be accepted');
  assert.ok(ch !== null, 'the primary connected the output channel');
  t.after(() => ch.destroy());
  assert.equal(primary.outputChannelOpen, true);
  const pvmSink = (pvmVm as unknown as { outputSink: (o: NicOutput) => void }).outputSink;
  pvmSink(reply(0, 'Z'));
  pvmSink(reply(1, 'A'));
  return {
    primary,
    ch,
    triggers,
    delivered,
    channelBroke: () => machine.emit('direct-output-failed', 'write EPIPE'),
    pvmOutput: pvmSink,
    svmOutput: (o) => (svmVm as unknown as { outputSink: (o: NicOutput) => void }).outputSink(o),
    mainOutputs: () => mainOutputs,
    // secondary.stop() (at the test's end) stops it too: counted only before.
    directStops: () => directStops,
  };
}

const reply = (offset: number, s: string): NicOutput => ({ kind: 'out', conn: 1, offset, bytes: Buffer.from(s) });
const shown = (outs: NicOutput[]): string[] => outs.map((o) => (o.kind === 'out' ? `${o.offset}:${Buffer.from(o.bytes).toString()}` : o.kind));

test('colo net: SVM output that goes on the main channel after the output channel broke is compared after what the broken channel still delivers: no mismatch', async (t) => {
  const p = await pairWithChannel(t);
  // The SVM's vCPU wrote 'Z' on the output channel, then the channel broke under its next
  // batch, 'A', which it hands to the main thread for the main channel. The primary reads the
  // main channel first ('Z' still waits in the channel's socket, or is on the way).
  p.channelBroke();
  p.svmOutput(reply(1, 'A'));
  await waitFor("the SVM's 'A' on the main channel", () => p.mainOutputs() === 1, 5000, 2);
  assert.deepEqual([p.triggers, shown(p.delivered)], [[], []], "'A' waits for the channel's rest");
  p.ch.end(encodeOutputFrames(0, [reply(0, 'Z')]));
  await waitFor('the primary to read the broken output channel to its end', () => !p.primary.outputChannelOpen, 5000, 2);
  assert.deepEqual(p.triggers, [], 'no checkpoint asked for');
  assert.deepEqual(shown(p.delivered), ['0:Z', '1:A'], 'both replies matched and released, in order');
  // Output on the main channel from now on is compared as it comes.
  p.pvmOutput(reply(2, 'B'));
  p.svmOutput(reply(2, 'B'));
  await waitFor("the SVM's 'B' compared", () => p.delivered.length === 3, 5000, 2);
  assert.deepEqual([p.triggers, shown(p.delivered)], [[], ['0:Z', '1:A', '2:B']]);
});

test('colo net: an output channel that does not end after the secondary moved its output is closed by the primary after a bound; what waited is compared then', async (t) => {
  const p = await pairWithChannel(t);
  p.ch.write(encodeOutputFrames(0, [reply(0, 'Z')]));
  await waitFor("the SVM's 'Z' from the output channel", () => p.delivered.length === 1, 5000, 2);
  // The secondary moved its output to the main channel, but its side of the channel does not
  // end (a FIN lost on the way, say).
  const movedAt = performance.now();
  p.channelBroke();
  p.svmOutput(reply(1, 'A'));
  await waitFor('the primary to close the output channel itself', () => !p.primary.outputChannelOpen, 10000, 5);
  const waited = performance.now() - movedAt;
  assert.ok(waited >= limits.coloOutputChannelDrainMs - 1, `it waited for the channel's end (${waited.toFixed(0)} ms)`);
  assert.deepEqual(shown(p.delivered), ['0:Z', '1:A'], "the SVM's 'A' was compared then");
  // The timeout for the PVM's 'A' (coloCompareTimeoutMs) ran out while it waited.
  assert.deepEqual(p.triggers, ['timeout']);
});

test('colo net: an SVM that takes no mirrored input stops the primary reading its clients once the secondary holds coloSvmInputPendingBytesMax of it, and none of it is dropped', async (t) => {
  const triggers: string[] = [];
  const { vm: pvmVm, calls } = standIn();
  let secondary: SecondaryNet | null = null;
  const primary = new PrimaryNet(pvmVm, { mainUnsentBytes: 0, sendColoNet: (p: Uint8Array) => secondary?.onFrame({ payload: Buffer.from(p) } as Frame) } as unknown as SourceSession, (reason) => triggers.push(reason), (err) => triggers.push(`broken: ${err.message}`));
  // The SVM's machine: what was injected and not taken yet counts, as Machine.pendingInputBytes.
  const injected: NicInput[] = [];
  let taken = 0;
  const charge = (ev: NicInput): number => limits.nicInputEventCharge + (ev.kind === 'data' ? ev.bytes.byteLength : 0);
  const machine = Object.defineProperty(
    Object.assign(new EventEmitter(), { setOutputEpoch: () => undefined, stopDirectOutput: () => undefined, injectInput: (ev: NicInput) => injected.push(ev) }),
    'pendingInputBytes',
    { get: () => injected.slice(taken).reduce((n, ev) => n + charge(ev), 0) },
  );
  const sent: string[] = [];
  secondary = new SecondaryNet({ machine, outputSink: null } as unknown as Vm, {
    migrationId: null,
    sendColoNet: (p: Uint8Array) => {
      sent.push(decodeNetBatch(Buffer.from(p)).type);
      primary.onFrame({ payload: Buffer.from(p) } as Frame);
    },
  } as unknown as IncomingSession);
  assert.equal(await secondary.start(), null, 'no output channel: the mirror comes on the main channel');
  primary.start();
  t.after(() => {
    primary.stop();
    secondary?.stop();
  });
  const tap = (pvmVm as unknown as { inputTap: (ev: NicInput) => void }).inputTap;
  const chunk = 256 * 1024;
  const chunks = Math.ceil((limits.coloSvmInputPendingBytesMax * 1.5) / chunk);
  tap({ seq: 1, kind: 'open', conn: 1 });
  for (let i = 0; i < chunks; i++) tap({ seq: 2 + i, kind: 'data', conn: 1, bytes: new Uint8Array(chunk).fill(i & 0xff) });
  await waitFor('the mirror to reach the secondary', () => injected.length === chunks + 1, 5000, 2);
  assert.deepEqual(injected.map((ev) => ev.seq), Array.from({ length: chunks + 1 }, (_, i) => i + 1), 'every event, in order');
  assert.deepEqual(sent, ['input-held'], 'the secondary said so, once');
  assert.deepEqual(calls, ['pauseReading'], "the primary stopped reading its clients");
  assert.deepEqual(triggers, ['resync'], 'and asked for a checkpoint');
  // The SVM takes some of it: still above half.
  taken = Math.floor(chunks / 4);
  await new Promise((resolve) => setTimeout(resolve, 3 * limits.coloCompareScanMs));
  assert.deepEqual([sent, calls], [['input-held'], ['pauseReading']], 'above half: still held');
  taken = chunks;
  await waitFor('the primary to read its clients again', () => calls.length === 2, 5000, 2);
  assert.deepEqual([sent, calls, triggers], [['input-held', 'input-free'], ['pauseReading', 'resumeReading'], ['resync']]);
});

/**
 * One compare timeout of the current epoch, then the checkpoint it asks for: the PVM's 'A'
 * (offset `at`) waits for an SVM copy that does not come.
 */
async function timeoutCheckpoint(p: Awaited<ReturnType<typeof pairWithChannel>>, at: number): Promise<void> {
  const n = p.triggers.filter((x) => x === 'timeout').length;
  p.pvmOutput(reply(at, 'A'));
  await waitFor(`compare timeout ${n + 1}`, () => p.triggers.filter((x) => x === 'timeout').length > n, 5000, 5);
  p.primary.pvmNextEpoch();
  p.primary.checkpoint();
  p.primary.svmResumed();
}

test('colo net: an output channel that delivers nothing through several compare timeouts in a row is given up; the secondary is told on the main channel; one that delivers is kept', async (t) => {
  const p = await pairWithChannel(t);
  // The vCPU took the channel (its mirror-ready): SVM output comes there from now on.
  p.ch.write(encodeMirrorReady());
  await waitFor('the mirror-ready marker', () => p.primary.outputChannelBytes > 0, 5000, 2);
  // A channel that delivers something between timeouts (an SVM that is only slow) is kept.
  let at = 2;
  for (let i = 0; i <= limits.coloOutputChannelSilentTimeouts; i++) {
    await timeoutCheckpoint(p, at++);
    p.ch.write(encodeOutputFrames(i + 1, [reply(1000 + i, 'late')]));
    const bytes = p.primary.outputChannelBytes;
    await waitFor('the SVM output on the channel', () => p.primary.outputChannelBytes > bytes, 5000, 2);
  }
  assert.equal(p.primary.outputChannelOpen, true, 'a channel that delivers is kept');
  assert.equal(p.primary.outputChannelStalls, 0);
  // Silent from now on (a path that forwards nothing): given up at the limit, not before.
  for (let i = 0; i <= limits.coloOutputChannelSilentTimeouts; i++) {
    assert.equal(p.primary.outputChannelOpen, true, `kept through ${i} silent timeouts`);
    await timeoutCheckpoint(p, at++);
  }
  assert.equal(p.primary.outputChannelOpen, false, 'the silent channel is given up');
  assert.equal(p.primary.outputChannelStalls, 1);
  assert.equal(p.primary.mirrorOnChannel, false, 'the mirror goes on the main channel');
  assert.deepEqual(p.triggers.slice(-2), ['timeout', 'resync'], 'a checkpoint makes good what the channel lost');
  assert.equal(p.directStops(), 1, 'the secondary was told to give the channel up');
  // The primary's end is closed: the secondary's sees it (on a path that still forwards).
  p.ch.resume();
  await waitFor("the channel's end on the secondary's side", () => p.ch.readableEnded, 5000, 2);
  // SVM output on the main channel (of the epoch after the checkpoints so far) is compared as it comes.
  const before = p.delivered.length;
  p.pvmOutput(reply(at, 'B'));
  for (const payload of encodeOutputs(at - 2, [reply(at, 'B')])) p.primary.onFrame({ payload } as Frame);
  await waitFor("the SVM's 'B' compared", () => p.delivered.length === before + 1, 5000, 2);
});
