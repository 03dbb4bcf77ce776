import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Compare } from '../../src/colo/compare.js';
import { ChannelFrameReader, decodeNetBatch, encodeChannelDropped, encodeInputFrames, encodeInputPressure, encodeInputs, encodeMirrorReady, encodeOutputFrames, encodeOutputMoved, encodeOutputs, encodeSvmCrashed } from '../../src/colo/net-wire.js';
import { limits } from '../../src/core/limits.js';
import type { NicInput, NicOutput } from '../../src/net/nic.js';
import { StreamError } from '../../src/core/errors.js';

const enc = new TextEncoder();
const out = (conn: number, offset: number, s: string): NicOutput => ({ kind: 'out', conn, offset, bytes: enc.encode(s) });
const text = (outs: readonly NicOutput[]): string => outs.map((o) => (o.kind === 'out' ? `${o.conn}@${o.offset}:${Buffer.from(o.bytes).toString()}` : `${o.conn}@${o.offset}:${o.kind}`)).join(' ');
const lim = { timeoutMs: 100, heldBytesMax: 1000 };

test('compare: releases only the common prefix of both guests, per connection, at the right offsets', () => {
  const c = new Compare(lim);
  assert.equal(text(c.pvm(out(1, 0, '+OK\r\n:1'), 0).release), '');
  assert.equal(text(c.svm(0, out(1, 0, '+OK'), 1).release), '1@0:+OK');
  assert.equal(text(c.svm(0, out(1, 3, '\r\n:1\r\n'), 2).release), '1@3:\r\n:1');
  assert.equal(text(c.pvm(out(1, 7, '\r\n'), 3).release), '1@7:\r\n');
  // Another connection is independent.
  assert.equal(text(c.svm(0, out(2, 0, 'x'), 4).release), '');
  assert.equal(c.held, 1);
  assert.equal(text(c.pvm(out(2, 0, 'xy'), 5).release), '2@0:x');
  assert.equal(c.matchedBytes, 10);
  // The PVM's output waited 1 ms, then 2 ms (its rest, for the SVM's next output), then not
  // at all (the SVM's came first), twice.
  assert.equal(c.matchedChunks, 4);
  assert.equal(c.pvmWaitMsSum, 3);
});

test('compare: a reply whose SVM copy came more than 1 ms after the PVM\'s is reported with both times; others are not', () => {
  const late: [number, number][] = [];
  const c = new Compare(lim, () => 0, (pvmAt, svmAt) => late.push([pvmAt, svmAt]));
  c.pvm(out(1, 0, 'a'), 10);
  c.svm(0, out(1, 0, 'a'), 13.5); // 3.5 ms late: reported
  c.pvm(out(1, 1, 'b'), 20);
  c.svm(0, out(1, 1, 'b'), 21); // 1 ms: not more than 1 ms
  c.svm(0, out(1, 2, 'c'), 30);
  c.pvm(out(1, 2, 'c'), 40); // the SVM's came first
  c.pvm(out(2, 0, 'xy'), 50);
  c.svm(0, out(2, 0, 'x'), 52); // a part of the PVM's chunk, 2 ms late
  c.svm(0, out(2, 1, 'y'), 53);
  assert.deepEqual(late, [
    [10, 13.5],
    [50, 52],
    [50, 53],
  ]);
  assert.equal(c.matchedChunks, 5);
});

test('compare: a difference is a mismatch, reported once per epoch; the checkpoint releases the PVM output and drops the SVM output', () => {
  const c = new Compare(lim);
  c.pvm(out(1, 0, 'time 100'), 0);
  const r = c.svm(0, out(1, 0, 'time 101'), 0);
  assert.equal(r.trigger, 'mismatch');
  assert.equal(text(r.release), '');
  assert.equal(c.pvm(out(1, 8, '!'), 1).trigger, null, 'reported once');
  assert.equal(text(c.checkpoint().release), '1@0:time 100 1@8:!');
  assert.equal(c.epoch, 1);
  // Stale SVM output (epoch 0) is ignored; the new epoch compares from the released offset.
  assert.equal(c.svm(0, out(1, 9, 'late'), 2).release.length, 0);
  c.pvm(out(1, 9, 'ok'), 3);
  assert.equal(text(c.svm(1, out(1, 9, 'ok'), 3).release), '1@9:ok');
  // A mismatch in the new epoch is reported again.
  c.pvm(out(1, 11, 'a'), 4);
  assert.equal(c.svm(1, out(1, 11, 'b'), 4).trigger, 'mismatch');
});

test('compare: SVM output of the next epoch that comes before the checkpoint waits for it, then is compared', () => {
  const c = new Compare(lim);
  c.pvm(out(1, 0, '+OK\r\n'), 0);
  // The SVM already runs from the checkpoint: its output is epoch 1 while the primary is in 0.
  assert.equal(c.svm(1, out(1, 5, ':2\r\n'), 1).release.length, 0);
  assert.equal(c.held, 5 + 4);
  assert.equal(text(c.checkpoint().release), '1@0:+OK\r\n');
  // An epoch further ahead cannot be: it is dropped like stale output.
  assert.equal(c.svm(3, out(1, 9, 'x'), 2).release.length, 0);
  assert.equal(c.held, 4);
  assert.equal(text(c.pvm(out(1, 5, ':2\r\n'), 2).release), '1@5::2\r\n');
  assert.equal(c.held, 0);
  // Early output that differs from the PVM's is a mismatch of the new epoch.
  c.svm(2, out(1, 9, 'a'), 3);
  c.checkpoint();
  assert.equal(c.pvm(out(1, 9, 'b'), 4).trigger, 'mismatch');
  // Early output beyond the held limit is dropped; the hole is a mismatch once compared.
  const d = new Compare({ timeoutMs: 100, heldBytesMax: 4 });
  d.svm(1, out(1, 0, 'abc'), 0);
  d.svm(1, out(1, 3, 'def'), 0);
  d.svm(1, out(1, 6, 'g'), 0);
  assert.equal(d.held, 4);
  d.checkpoint();
  const r = d.pvm(out(1, 0, 'abcdefg'), 1);
  assert.equal(`${text(r.release)}|${r.trigger}`, '|mismatch');
});

test('compare: PVM output after the checkpoint captured the PVM waits for that checkpoint; then it is compared, and released or found different', () => {
  const c = new Compare(lim);
  c.pvm(out(1, 0, '+OK\r\n'), 0);
  c.pvmNextEpoch();
  // The PVM runs on while the checkpoint travels: its output is the next epoch's, held even
  // though the SVM (still in this epoch) produced the same bytes at those offsets.
  assert.equal(c.pvm(out(1, 5, ':1\r\n'), 1).release.length, 0);
  assert.equal(c.svm(0, out(1, 0, '+OK\r\n:1\r\n'), 1).release.map((o) => (o.kind === 'out' ? o.offset : -1)).join(), '0');
  assert.equal(c.held, 4 + 4);
  // The SVM's copy of the new epoch came early too; at the checkpoint both match and go out,
  // after nothing else (the PVM's held output of the old epoch was released on the match above).
  c.svm(1, out(1, 5, ':1\r\n'), 2);
  const r = c.checkpoint();
  assert.equal(`${text(r.release)}|${r.trigger}`, '1@5::1\r\n|null');
  assert.equal(c.held, 0);
  // Further output is compared directly again.
  c.pvm(out(1, 9, 'x'), 3);
  assert.equal(text(c.svm(1, out(1, 9, 'x'), 3).release), '1@9:x');
  // Early output of both sides that differs is a mismatch reported by the checkpoint.
  c.pvm(out(2, 0, 'P'), 4);
  c.pvmNextEpoch();
  c.pvm(out(2, 1, 'time 1'), 5);
  c.svm(2, out(2, 1, 'time 2'), 5);
  const m = c.checkpoint();
  assert.equal(`${text(m.release)}|${m.trigger}`, '2@0:P|mismatch');
  // A failover releases the PVM's output of both epochs, in order.
  const f = new Compare(lim);
  f.pvm(out(1, 0, 'a'), 0);
  f.pvmNextEpoch();
  f.pvm(out(1, 1, 'b'), 1);
  f.pvm({ kind: 'close', conn: 1, offset: 2 }, 1);
  assert.equal(text(f.releaseAll()), '1@0:a 1@1:b 1@2:close');
  assert.equal(f.held, 0);
});

test('compare: output waiting on one side past the timeout asks for a checkpoint; so does too much held output', () => {
  const c = new Compare(lim);
  c.pvm(out(1, 0, 'hello'), 1000);
  assert.equal(c.check(1050), null);
  assert.equal(c.check(1101), 'timeout');
  assert.equal(c.check(1200), null, 'reported once per epoch');
  c.checkpoint();
  assert.equal(c.check(5000), null, 'nothing held after the checkpoint');
  const big = 'x'.repeat(600);
  c.svm(1, out(3, 0, big), 0);
  assert.equal(c.svm(1, out(3, 600, big), 0).trigger, 'timeout', 'held bytes above the limit');
});

test('compare: output that came during a long checkpoint waits from the epoch it belongs to, not from when it came', () => {
  const c = new Compare(lim);
  c.pvm(out(1, 0, 'a'), 0);
  c.svm(0, out(1, 0, 'a'), 0);
  // The checkpoint captures the PVM at 10 ms and its transfer takes 500 ms (5 × the timeout);
  // the PVM runs on and answers a request at 20 ms; the SVM gets the state at 510 ms and runs
  // it at 515 ms.
  c.pvmNextEpoch();
  c.pvm(out(1, 1, 'b'), 20);
  assert.equal(c.check(400), null, 'waiting for the checkpoint, not for the SVM');
  c.checkpoint();
  c.svmResumed(515);
  assert.equal(c.check(610), null, 'the SVM could not have answered before 515');
  assert.equal(c.check(616), 'timeout', 'but it had 100 ms from there');
});

test('compare: output of a new epoch waits for the SVM from when it runs the checkpoint (VMSTATE_LOADED), not from VMSTATE_RECEIVED: a slow apply asks for no checkpoint', () => {
  const c = new Compare(lim);
  // VMSTATE_RECEIVED at 0: the PVM runs on and answers at 10 ms, while the SVM applies the
  // checkpoint (RAM from the cache, device state, disk) until 400 ms, 4 × the timeout.
  c.checkpoint();
  c.pvm(out(1, 0, 'a'), 10);
  assert.equal(c.check(300), null, 'the SVM is still applying: it could not have answered');
  assert.equal(c.check(390), null);
  c.svmResumed(400);
  assert.equal(c.check(500), null, 'the SVM has had 100 ms since it runs');
  assert.equal(c.check(501), 'timeout', 'past that it is a timeout');
  // Output that comes after the SVM runs waits from when it came.
  c.checkpoint();
  c.svmResumed(600);
  c.pvm(out(1, 1, 'b'), 700);
  assert.equal(c.check(800), null);
  assert.equal(c.check(801), 'timeout');
  // Matching output of the new epoch is released at once, before the SVM's resume is known
  // here (its output can overtake VMSTATE_LOADED).
  c.checkpoint();
  c.pvm(out(1, 2, 'c'), 900);
  assert.equal(text(c.svm(3, out(1, 2, 'c'), 901).release), '1@2:c');
});

test('compare: shut and close are compared like bytes; a closed connection is forgotten once both closed', () => {
  const c = new Compare(lim);
  c.pvm(out(4, 0, 'bye'), 0);
  c.pvm({ kind: 'close', conn: 4, offset: 3 }, 0);
  assert.equal(text(c.svm(0, out(4, 0, 'bye'), 0).release), '4@0:bye');
  assert.equal(text(c.svm(0, { kind: 'close', conn: 4, offset: 3 }, 0).release), '4@3:close');
  assert.equal(c.connectionCount(), 0);
  // The SVM closing where the PVM still sends is a mismatch.
  c.pvm(out(5, 0, 'more'), 0);
  assert.equal(c.svm(0, { kind: 'close', conn: 5, offset: 0 }, 0).trigger, 'mismatch');
  assert.equal(text(c.releaseAll()), '5@0:more');
});

test('compare: a shut or close after bytes that never came (a hole) is a mismatch, not a match', () => {
  // The SVM diverged and wrote 20 bytes before closing; those bytes were lost (dropped early, or
  // with a broken channel). Its close at offset 20 must not match the PVM's close at 0.
  const c = new Compare(lim);
  assert.equal(text(c.pvm({ kind: 'close', conn: 1, offset: 0 }, 0).release), '');
  const r = c.svm(0, { kind: 'close', conn: 1, offset: 20 }, 0);
  assert.equal(`${text(r.release)}|${r.trigger}`, '|mismatch');
  // The same for a shut, and the checkpoint then releases the PVM's.
  c.pvm({ kind: 'shut', conn: 2, offset: 0 }, 0);
  assert.equal(text(c.svm(0, { kind: 'shut', conn: 2, offset: 4 }, 0).release), '');
  assert.equal(text(c.checkpoint().release), '1@0:close 2@0:shut');
});

test('compare: the SVM\'s output for a connection both closed in this epoch is a repeat: not held, no timeout', () => {
  const c = new Compare(lim);
  c.pvm(out(3, 0, 'bye'), 0);
  c.pvm({ kind: 'close', conn: 3, offset: 3 }, 0);
  c.svm(0, out(3, 0, 'bye'), 0);
  assert.equal(text(c.svm(0, { kind: 'close', conn: 3, offset: 3 }, 0).release), '3@3:close');
  // A batch posted again after part of it reached the compare over the output channel.
  assert.equal(text(c.svm(0, out(3, 0, 'bye'), 1).release), '');
  assert.equal(text(c.svm(0, { kind: 'close', conn: 3, offset: 3 }, 1).release), '');
  assert.equal(c.connectionCount(), 0, 'no connection held for the repeat');
  assert.equal(c.held, 0);
  assert.equal(c.check(1000), null, 'nothing waits, so no timeout');
  // A repeated shut, whether the first was matched already or still waits, is not compared
  // with what the PVM does next (its close).
  c.pvm({ kind: 'shut', conn: 4, offset: 0 }, 0);
  c.svm(0, { kind: 'shut', conn: 4, offset: 0 }, 0);
  c.svm(0, { kind: 'shut', conn: 4, offset: 0 }, 1);
  c.svm(0, { kind: 'shut', conn: 5, offset: 0 }, 1);
  c.svm(0, { kind: 'shut', conn: 5, offset: 0 }, 1);
  c.pvm({ kind: 'shut', conn: 5, offset: 0 }, 2);
  c.pvm({ kind: 'close', conn: 4, offset: 0 }, 2);
  c.pvm({ kind: 'close', conn: 5, offset: 0 }, 2);
  const r4 = c.svm(0, { kind: 'close', conn: 4, offset: 0 }, 3);
  const r5 = c.svm(0, { kind: 'close', conn: 5, offset: 0 }, 3);
  assert.equal(`${text(r4.release)} ${text(r5.release)}|${r4.trigger}|${r5.trigger}`, '4@0:close 5@0:close|null|null');
});

test('compare: a batch the SVM repeated that came before the checkpoint of its epoch holds no second shut: no mismatch with the PVM\'s close', () => {
  // The SVM applied checkpoint 1 and sent its reply and shut twice (the output channel broke
  // part-way through the batch), all before the primary's VMSTATE_RECEIVED.
  const c = new Compare(lim);
  c.svm(1, out(1, 0, 'bye'), 0);
  c.svm(1, { kind: 'shut', conn: 1, offset: 3 }, 0);
  c.svm(1, out(1, 0, 'bye'), 1);
  c.svm(1, { kind: 'shut', conn: 1, offset: 3 }, 1);
  c.svm(1, { kind: 'close', conn: 1, offset: 3 }, 2);
  assert.equal(text(c.checkpoint().release), '');
  c.pvm(out(1, 0, 'bye'), 3);
  c.pvm({ kind: 'shut', conn: 1, offset: 3 }, 3);
  const r = c.pvm({ kind: 'close', conn: 1, offset: 3 }, 3);
  assert.equal(`${text(r.release)}|${r.trigger}`, '1@3:close|null');
  assert.equal(c.connectionCount(), 0);
  assert.equal(c.held, 0);
});

test('compare: a difference in the last byte is a mismatch, for short chunks (compared in a loop) and long ones', () => {
  for (const n of [1, 63, 64, 65, 200, 4096]) {
    const c = new Compare({ timeoutMs: 100, heldBytesMax: 1 << 20 });
    const same = 'r'.repeat(n);
    c.pvm(out(1, 0, same), 0);
    assert.equal(text(c.svm(0, out(1, 0, same), 0).release), `1@0:${same}`, `${n} equal bytes are released`);
    const a = 'q'.repeat(n - 1);
    c.pvm(out(1, n, `${a}x`), 0);
    const r = c.svm(0, out(1, n, `${a}y`), 0);
    assert.equal(`${text(r.release)}|${r.trigger}`, '|mismatch', `${n} bytes differing in the last one`);
  }
});

test('compare: repeated bytes (offsets already held) are not held twice', () => {
  const c = new Compare(lim);
  c.pvm(out(1, 0, 'abc'), 0);
  c.pvm(out(1, 1, 'bcd'), 0);
  assert.equal(text(c.svm(0, out(1, 0, 'abcd'), 0).release), '1@0:abc 1@3:d');
});

test('coloNet wire: input and output batches round-trip; corrupt payloads give a typed error', () => {
  const inputs: NicInput[] = [
    { seq: 1, kind: 'open', conn: 7 },
    { seq: 2, kind: 'data', conn: 7, bytes: enc.encode('PING\r\n') },
    { seq: 3, kind: 'close', conn: 7 },
  ];
  const [p] = encodeInputs(inputs);
  const b = decodeNetBatch(p!);
  assert.equal(b.type, 'input');
  assert.deepEqual(b.type === 'input' ? b.events.map((e) => ({ ...e, ...(e.kind === 'data' ? { bytes: Buffer.from(e.bytes).toString() } : {}) })) : null, [
    { seq: 1, kind: 'open', conn: 7 },
    { seq: 2, kind: 'data', conn: 7, bytes: 'PING\r\n' },
    { seq: 3, kind: 'close', conn: 7 },
  ]);
  const [q] = encodeOutputs(5, [out(7, 10, '+PONG\r\n'), { kind: 'shut', conn: 7, offset: 17 }]);
  const o = decodeNetBatch(q!);
  assert.equal(o.type === 'output' ? `${o.epoch} ${text(o.events)}` : '', '5 7@10:+PONG\r\n 7@17:shut');
  assert.throws(() => decodeNetBatch(q!.subarray(0, q!.byteLength - 1)), StreamError);
  const bad = Buffer.from(p!);
  bad.writeUInt8(9, 5); // unknown kind of the first event
  assert.throws(() => decodeNetBatch(bad), /unknown input kind/);
  assert.throws(() => decodeNetBatch(Buffer.from([9, 0, 0, 0, 0])), /unknown batch type/);
  // The secondary's back-pressure on the mirror: a tag and a zero count, nothing more.
  assert.deepEqual(decodeNetBatch(encodeInputPressure(true)), { type: 'input-held' });
  assert.deepEqual(decodeNetBatch(encodeInputPressure(false)), { type: 'input-free' });
  assert.throws(() => decodeNetBatch(Buffer.from([6, 0, 0, 0, 1])), /input-held carries data/);
  // The mirror-ready marker of the output channel: exactly a tag and a zero count.
  const ready = encodeMirrorReady();
  assert.equal(ready.readUInt32BE(0), ready.byteLength - 4);
  assert.deepEqual(decodeNetBatch(ready.subarray(4)), { type: 'mirror-ready' });
  assert.throws(() => decodeNetBatch(Buffer.from([3, 0, 0, 0, 1])), /mirror-ready carries data/);
  assert.throws(() => decodeNetBatch(Buffer.from([3, 0, 0, 0, 0, 0])), /mirror-ready carries data/);
  // The output-moved marker of the main channel: likewise.
  assert.deepEqual(decodeNetBatch(encodeOutputMoved()), { type: 'output-moved' });
  assert.throws(() => decodeNetBatch(Buffer.from([4, 0, 0, 0, 1])), /output-moved carries data/);
  assert.throws(() => decodeNetBatch(Buffer.from([4, 0, 0, 0, 0, 0])), /output-moved carries data/);
  // The secondary's guest crashed (main channel): likewise.
  assert.deepEqual(decodeNetBatch(encodeSvmCrashed()), { type: 'svm-crashed' });
  assert.throws(() => decodeNetBatch(Buffer.from([5, 0, 0, 0, 1])), /svm-crashed carries data/);
  assert.throws(() => decodeNetBatch(Buffer.from([5, 0, 0, 0, 0, 0])), /svm-crashed carries data/);
  // The primary gave the output channel up (main channel): likewise.
  assert.deepEqual(decodeNetBatch(encodeChannelDropped()), { type: 'channel-dropped' });
  assert.throws(() => decodeNetBatch(Buffer.from([8, 0, 0, 0, 1])), /channel-dropped carries data/);
  assert.throws(() => decodeNetBatch(Buffer.from([8, 0, 0, 0, 0, 0])), /channel-dropped carries data/);
  // Large batches split below the frame limit.
  const many: NicInput[] = Array.from({ length: 40 }, (_, i) => ({ seq: i + 1, kind: 'data', conn: 1, bytes: new Uint8Array(64 * 1024) }));
  const parts = encodeInputs(many);
  assert.ok(parts.length >= 2);
  assert.equal(parts.map((x) => (decodeNetBatch(x) as { events: unknown[] }).events.length).reduce((a, b) => a + b, 0), 40);
});

test('compare: a connection older than the compare goes on from what its client already received', () => {
  // Connection 7 delivered 500 bytes before COLO started.
  const delivered = new Map([[7, 500]]);
  const c = new Compare(lim, (conn) => delivered.get(conn) ?? 0);
  assert.equal(text(c.pvm(out(7, 500, '+OK\r\n'), 0).release), '');
  const r = c.svm(0, out(7, 500, '+OK\r\n'), 1);
  assert.equal(r.trigger, null, 'no gap, no mismatch');
  assert.equal(text(r.release), '7@500:+OK\r\n');
  // A connection opened under COLO starts at 0.
  c.pvm(out(8, 0, 'a'), 2);
  assert.equal(text(c.svm(0, out(8, 0, 'a'), 3).release), '8@0:a');

  // Output the PVM produced before the state was captured but handed over only after COLO
  // started: the SVM's state already counts it, so the SVM goes on after it. The guests do not
  // line up there; the checkpoint releases the PVM's bytes at the offset the client is at.
  const d2 = new Map([[3, 100]]);
  const c2 = new Compare(lim, (conn) => d2.get(conn) ?? 0);
  c2.pvm(out(3, 100, 'late'), 0);
  assert.equal(c2.svm(0, out(3, 104, 'next'), 1).trigger, 'mismatch');
  c2.pvm(out(3, 104, 'next'), 2);
  assert.equal(text(c2.checkpoint().release), '3@100:late 3@104:next');
});

test('SVM output channel wire: length-prefixed batches come back whole from any split of the stream; an oversized length is a typed error', () => {
  const a = encodeOutputFrames(3, [out(1, 0, '+OK\r\n'), { kind: 'close', conn: 1, offset: 5 }]);
  const b = encodeOutputFrames(4, [out(2, 9, 'x'.repeat(3000))]);
  const stream = Buffer.concat([a, b]);
  for (const cut of [1, 3, 4, 7, a.byteLength, a.byteLength + 2, stream.byteLength - 1]) {
    const r = new ChannelFrameReader();
    const frames = [...r.push(stream.subarray(0, cut)), ...r.push(stream.subarray(cut))];
    assert.equal(r.partial, 0, `cut at ${cut}`);
    assert.deepEqual(
      frames.map((f) => {
        const d = decodeNetBatch(f);
        return d.type === 'output' ? `${d.epoch} ${d.events.length} ${d.events[0]!.conn}@${d.events[0]!.offset}` : d.type;
      }),
      ['3 2 1@0', '4 1 2@9'],
      `cut at ${cut}`,
    );
  }
  // Output above limits.coloNetBatchBytes is several batches, each after its length, in one buffer.
  const many = Array.from({ length: 40 }, (_, i) => out(3, i * 65536, 'y'.repeat(65536)));
  const big = new ChannelFrameReader().push(encodeOutputFrames(9, many));
  assert.ok(big.length >= 2);
  assert.equal(big.map((f) => (decodeNetBatch(f) as { events: unknown[] }).events.length).reduce((x, y) => x + y, 0), 40);
  // Byte by byte: nothing until a batch is whole.
  const r = new ChannelFrameReader();
  let n = 0;
  for (let i = 0; i < a.byteLength; i++) n += r.push(a.subarray(i, i + 1)).length;
  assert.equal(n, 1);
  const huge = Buffer.alloc(8);
  huge.writeUInt32BE(limits.frameBytesMax + 1, 0);
  assert.throws(() => new ChannelFrameReader().push(huge), (e: unknown) => e instanceof StreamError && /limit/.test(e.message));
  const tiny = Buffer.from([0, 0, 0, 1, 1]);
  assert.throws(() => new ChannelFrameReader().push(tiny), (e: unknown) => e instanceof StreamError && /too short/.test(e.message));
  // The other way: mirrored input, length-prefixed the same way, large input split in batches.
  const inputs: NicInput[] = Array.from({ length: 40 }, (_, i) => ({ seq: i + 1, kind: 'data', conn: 2, bytes: new Uint8Array(65536).fill(i) }));
  const back = new ChannelFrameReader().push(Buffer.concat([encodeMirrorReady(), encodeInputFrames(inputs)]));
  assert.equal(decodeNetBatch(back[0]!).type, 'mirror-ready');
  assert.ok(back.length >= 3);
  const got = back.slice(1).flatMap((f) => {
    const d = decodeNetBatch(f);
    return d.type === 'input' ? d.events : [];
  });
  assert.deepEqual(got.map((e) => `${e.seq}:${e.kind === 'data' ? e.bytes[0] : '-'}`), inputs.map((e) => `${e.seq}:${e.seq - 1}`));
});

test('SVM output channel wire: a large batch read in many chunks is joined once, not copied again at every chunk', (t) => {
  // A 1 MiB reply is one batch; a socket hands it over in chunks (16 KiB here). Copying what
  // came so far at every chunk cost the primary's main thread O(size²): 12 ms per such reply,
  // 3 s for a batch of frameBytesMax, with every client waiting.
  const batch = encodeOutputFrames(1, [out(1, 0, 'z'.repeat(1 << 20))]);
  const concat = Buffer.concat;
  let copied = 0;
  Buffer.concat = (list: readonly Uint8Array[], totalLength?: number): Buffer<ArrayBuffer> => {
    const b = concat(list, totalLength);
    copied += b.byteLength;
    return b;
  };
  t.after(() => (Buffer.concat = concat));
  const r = new ChannelFrameReader();
  const frames: Buffer[] = [];
  for (let at = 0; at < batch.byteLength; at += 16384) {
    frames.push(...r.push(batch.subarray(at, at + 16384)));
    if (at + 16384 < batch.byteLength) assert.equal(r.partial, at + 16384, 'what came so far is held');
  }
  Buffer.concat = concat;
  assert.equal(frames.length, 1);
  assert.equal(r.partial, 0);
  const d = decodeNetBatch(frames[0]!);
  assert.ok(d.type === 'output' && d.events.length === 1 && d.events[0]!.kind === 'out' && d.events[0]!.bytes.byteLength === 1 << 20);
  assert.ok(copied <= batch.byteLength, `${copied} bytes copied for a ${batch.byteLength}-byte batch`);
});

test('compare: a PVM output matched whole is released as it is; a part of one, or one at another offset, as a new output', () => {
  const c = new Compare(lim);
  const a = out(1, 0, 'abc');
  assert.equal(c.pvm(a, 0).release.length, 0);
  const r = c.svm(0, out(1, 0, 'abc'), 1).release;
  assert.equal(r.length, 1);
  assert.equal(r[0], a, 'the PVM output object itself');
  // Only part of it matched: the release is that part, at its offset.
  const b = out(1, 3, 'defg');
  c.pvm(b, 2);
  const r2 = c.svm(0, out(1, 3, 'de'), 3).release;
  assert.notEqual(r2[0], b);
  assert.equal(text(r2), '1@3:de');
  assert.equal(text(c.svm(0, out(1, 5, 'fg'), 4).release), '1@5:fg');
  // A repeat the PVM sent again (offset below what it produced) is trimmed: never the object.
  const rep = out(1, 5, 'fgh');
  c.pvm(rep, 5);
  const r3 = c.svm(0, out(1, 7, 'h'), 6).release;
  assert.notEqual(r3[0], rep);
  assert.equal(text(r3), '1@7:h');
  // Results with nothing in them do not share a mutable array with the caller.
  assert.ok(Object.isFrozen(c.pvm(out(1, 8, 'i'), 7).release));
});

test('compare: a connection older than the compare whose client is gone goes on from its guests\' offsets: its close is no hole, no mismatch', () => {
  // Connection 7 sent 500 bytes before COLO started; its client reset it since (the front end
  // forgot it: null). The guests still hold it, and their offsets go on from 500.
  const c = new Compare(lim, (conn) => (conn === 7 ? null : 0));
  assert.equal(c.svm(0, out(7, 500, '-ERR\r\n'), 0).trigger, null);
  const r = c.pvm(out(7, 500, '-ERR\r\n'), 1);
  assert.equal(`${text(r.release)}|${r.trigger}`, '7@500:-ERR\r\n|null', 'matched at the guests\' offset');
  c.pvm({ kind: 'close', conn: 7, offset: 506 }, 2);
  const closed = c.svm(0, { kind: 'close', conn: 7, offset: 506 }, 3);
  assert.equal(`${text(closed.release)}|${closed.trigger}`, '7@506:close|null', 'the close matches: nothing to check-point');
  // A close as the first output (the usual case: the guest read the client's EOF and closed).
  c.pvm({ kind: 'close', conn: 8, offset: 42 }, 4);
  c.checkpoint(); // a new epoch: the SVM's output must not have lost the anchor
  const c2 = new Compare(lim, () => null);
  assert.equal(c2.pvm({ kind: 'close', conn: 8, offset: 42 }, 4).trigger, null);
  const r2 = c2.svm(0, { kind: 'close', conn: 8, offset: 42 }, 5);
  assert.equal(`${text(r2.release)}|${r2.trigger}`, '8@42:close|null');
  // The guests still differ there: a difference after the first output is a mismatch.
  const c3 = new Compare(lim, () => null);
  c3.pvm(out(9, 100, 'ab'), 0);
  assert.equal(c3.svm(0, out(9, 100, 'ax'), 1).trigger, 'mismatch');
  const c4 = new Compare(lim, () => null);
  c4.pvm(out(9, 100, 'ab'), 0);
  assert.equal(c4.svm(0, out(9, 101, 'b'), 1).trigger, 'mismatch', 'a gap in the SVM\'s output after the first one is still a hole');
  assert.equal(text(c4.checkpoint().release), '9@100:ab', 'the checkpoint releases the PVM\'s at its offset');
});

test('compare: connections closed in one epoch are remembered up to a bound, at which a checkpoint is asked for, and the bound holds until it comes', () => {
  const c = new Compare({ ...lim, closedConnectionsMax: 4 });
  const churn = (conn: number): string | null => {
    c.pvm(out(conn, 0, 'bye'), 0);
    c.svm(c.epoch, out(conn, 0, 'bye'), 0);
    c.pvm({ kind: 'close', conn, offset: 3 }, 0);
    const r = c.svm(c.epoch, { kind: 'close', conn, offset: 3 }, 0);
    assert.equal(text(r.release), `${conn}@3:close`, `connection ${conn} closes on a match`);
    return r.trigger;
  };
  for (let conn = 1; conn <= 3; conn++) assert.equal(churn(conn), null, `${conn} closed connections ask for nothing`);
  assert.equal(churn(4), 'timeout', 'the fourth closed connection of the epoch asks for a checkpoint');
  // Until it comes, more churn asks again for nothing, and the oldest closed ids are forgotten:
  // a repeat of the SVM's for one is output held for a connection nobody serves (unmatched).
  for (let conn = 5; conn <= 8; conn++) assert.equal(churn(conn), null);
  c.svm(0, out(1, 0, 'bye'), 1);
  assert.equal(c.connectionCount(), 1, 'connection 1 was forgotten: its repeat is held');
  assert.equal(c.svm(0, out(8, 0, 'bye'), 1).release.length, 0, 'a repeat for a recently closed connection is dropped');
  assert.equal(c.connectionCount(), 1);
  // The checkpoint forgets them all; the next epoch counts from nothing.
  c.checkpoint();
  c.svmResumed(0);
  for (let conn = 9; conn <= 11; conn++) assert.equal(churn(conn), null);
  assert.equal(churn(12), 'timeout');
});

test('compare: a checkpoint forgets the connections whose close it released, and what the SVM did on the others: its shut in the next epoch is compared, not a repeat', () => {
  const c = new Compare(lim);
  // The SVM shut a connection the PVM had not shut yet; the checkpoint replaces the SVM's state.
  c.pvm(out(1, 0, 'ab'), 0);
  assert.equal(text(c.svm(0, out(1, 0, 'ab'), 0).release), '1@0:ab');
  c.svm(0, { kind: 'shut', conn: 1, offset: 2 }, 1);
  // Another connection the PVM closed: the checkpoint releases the close.
  c.pvm({ kind: 'close', conn: 2, offset: 0 }, 1);
  assert.equal(text(c.checkpoint().release), '2@0:close');
  assert.equal(c.connectionCount(), 1, 'a connection closed at a checkpoint is not held for ever');
  c.svmResumed(2);
  // In the new epoch both guests shut connection 1: it goes out at once, no timeout waits for it.
  c.pvm({ kind: 'shut', conn: 1, offset: 2 }, 3);
  assert.equal(text(c.svm(1, { kind: 'shut', conn: 1, offset: 2 }, 3).release), '1@2:shut');
  assert.equal(c.check(3 + lim.timeoutMs + 1), null);
});

test('compare: PVM output held for the next epoch counts as held output (an exiting guest waits for it)', () => {
  const c = new Compare(lim);
  assert.equal(c.holdsPvmOutput, false);
  c.pvmNextEpoch();
  c.pvm(out(1, 0, 'last reply'), 0);
  assert.equal(c.holdsPvmOutput, true, 'the checkpoint in flight releases it: the process must not exit before');
  c.svm(1, out(1, 0, 'last reply'), 1);
  assert.equal(text(c.checkpoint().release), '1@0:last reply');
  assert.equal(c.holdsPvmOutput, false);
});
