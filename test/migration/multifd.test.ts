/**
 * Multifd channels in one process: real worker threads and loopback sockets, two guest RAMs
 * as shared WebAssembly memories.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import net from 'node:net';
import { MultifdReceiver, MultifdSender, type PageTarget } from '../../src/migration/multifd.js';
import {
  ChannelStatus,
  decodeChannelAnswer,
  decodePacketHeader,
  encodeChannelHello,
  encodePacket,
  encodePacketHeader,
  multifdVersion,
  PacketFlags,
  packetHeaderBytes,
  payloadBytesOf,
} from '../../src/migration/multifd-format.js';
import { splitKnownZero } from '../../src/migration/zero.js';
import { encodeZeroRanges, PageSink } from '../../src/migration/ram.js';
import { FrameType } from '../../src/migration/stream.js';
import { StreamError } from '../../src/core/errors.js';
import { waitFor, withTimeout } from '../framework/harness.js';
import { limits } from '../../src/core/limits.js';

const pageBytes = 4096;
const wasmPages = 64; // 4 MiB
const pages = (wasmPages * 65536) / pageBytes;

function memory(): WebAssembly.Memory {
  return new WebAssembly.Memory({ initial: wasmPages, maximum: wasmPages, shared: true });
}

interface Pair {
  src: WebAssembly.Memory;
  dst: WebAssembly.Memory;
  sender: MultifdSender;
  receiver: MultifdReceiver;
  channels: number;
}

async function pair(t: { after(fn: () => unknown): void }, channels: number, target: PageTarget = { ram: true, cache: null, received: null }, shadow: SharedArrayBuffer | null = null): Promise<Pair> {
  const id = new Uint8Array(crypto.randomBytes(16));
  const src = memory();
  const dst = memory();
  const ramPages = new SharedArrayBuffer(4);
  new Int32Array(ramPages)[0] = pages;
  const receiver = await MultifdReceiver.start({ memory: dst, host: '127.0.0.1', migrationId: id, channels, pagesMax: pages, ramPages, ramMaybeNonZero: null, target });
  t.after(() => receiver.destroy());
  const sender = await MultifdSender.connect({ memory: src, host: '127.0.0.1', ports: receiver.ports, migrationId: id, pagesMax: pages, shadow });
  t.after(() => sender.destroy());
  return { src, dst, sender, receiver, channels };
}

/** Fill pages with a pattern: every third page zero, the others numbered. */
function fillPattern(mem: WebAssembly.Memory, salt: number): void {
  const b = Buffer.from(mem.buffer);
  for (let p = 0; p < pages; p++) {
    if (p % 3 === 0) b.fill(0, p * pageBytes, (p + 1) * pageBytes);
    else b.fill((p * 7 + salt) & 0xff || 1, p * pageBytes, (p + 1) * pageBytes);
  }
}

async function round(p: Pair, r: number, list: number[]): Promise<{ sent: { normalPages: number; zeroPages: number; channels: number }; got: { pages: number } }> {
  const sent = await p.sender.sendRound(r, (l) => {
    l.set(list);
    return list.length;
  }, 0);
  // A small round wakes only the channels it fills: the barrier waits for those (roundEnd says how many).
  assert.equal(sent.channels, Math.min(p.channels, Math.ceil(list.length / limits.pagesPerPacketMax)), 'channels taking part in the round');
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`round ${r}: the barrier did not see SYNC from ${sent.channels} channels within 10 s`)), 10000);
  });
  try {
    return { sent, got: await Promise.race([p.receiver.barrier(r, sent.channels), timeout]) };
  } finally {
    clearTimeout(timer);
  }
}

for (const copyReads of [false, true]) {
  test(`rounds move every page; the barrier counts them (${copyReads ? "'data' event reads" : 'user-buffer reads'})`, async (t) => {
    if (copyReads) process.env.COLO_MULTIFD_COPY_READS = '1';
    t.after(() => delete process.env.COLO_MULTIFD_COPY_READS);
    const shadow = new SharedArrayBuffer(pages * pageBytes);
    const p = await pair(t, 3, undefined, shadow);
    Buffer.from(p.dst.buffer).fill(0xee); // stale content the zero pages must clear
    fillPattern(p.src, 1);
    const all = Array.from({ length: pages }, (_, i) => i);
    const r1 = await round(p, 1, all);
    assert.equal(r1.got.pages, pages);
    assert.equal(r1.sent.normalPages + r1.sent.zeroPages, pages);
    assert.equal(r1.sent.zeroPages, Math.ceil(pages / 3));
    assert.ok(Buffer.from(p.src.buffer).equals(Buffer.from(p.dst.buffer)), 'destination RAM equals source RAM after round 1');
    assert.ok(Buffer.from(shadow).equals(Buffer.from(p.src.buffer)), 'the shadow records what was sent');
    // Round 2: a few pages changed.
    const changed = [5, 6, 7, 100, 101, pages - 1];
    for (const pg of changed) Buffer.from(p.src.buffer).fill(0x42, pg * pageBytes, (pg + 1) * pageBytes);
    const r2 = await round(p, 2, changed);
    assert.equal(r2.got.pages, changed.length);
    assert.ok(Buffer.from(p.src.buffer).equals(Buffer.from(p.dst.buffer)));
  });
}

test('pages never written since boot travel as ranges, unread, and cost the destination nothing', () => {
  const pagesN = 20000;
  const written = new Uint8Array(pagesN);
  const boot = new Uint8Array(pagesN);
  boot.fill(1, 0, 3); // data segments
  written.fill(1, 5000, 5010);
  written[9000] = 1;
  written[9010] = 1; // a 9-page hole between two writes: too short for a range
  const { zero, data } = splitKnownZero([[0, 12000], [12100, pagesN]], written, boot);
  assert.deepEqual(zero, [[3, 5000], [5010, 9000], [9011, 12000], [12100, pagesN]]);
  assert.deepEqual(data, [[0, 3], [5000, 5010], [9000, 9011]]);
  assert.deepEqual(splitKnownZero([[0, 10]], null, boot), { zero: [], data: [[0, 10]] });

  // The destination: RAM it never wrote is left alone; a page it wrote is cleared.
  const mem = new WebAssembly.Memory({ initial: 2, maximum: 2, shared: true });
  const ram = Buffer.from(mem.buffer);
  const maybe = new SharedArrayBuffer(32);
  ram.fill(9, 4 * pageBytes, 5 * pageBytes);
  new Uint8Array(maybe)[4] = 1;
  ram.fill(7, 6 * pageBytes, 7 * pageBytes); // not marked: the sink trusts the map and skips it
  const sink = new PageSink(mem, 32, { ram: true, cache: null, received: null }, maybe);
  const frame = { type: FrameType.ramZeroRanges, flags: 0, seq: 0, payload: encodeZeroRanges([[2, 8]]) };
  assert.equal(sink.apply(frame), 6);
  assert.ok(ram.subarray(4 * pageBytes, 5 * pageBytes).every((b) => b === 0));
  assert.equal(ram[6 * pageBytes], 7);
  assert.throws(() => sink.apply({ ...frame, payload: encodeZeroRanges([[8, 2]]) }), /bad range/);
  assert.throws(() => sink.apply({ ...frame, payload: encodeZeroRanges([[30, 40]]) }), /bad range/);
});

test('COLO hook: pages redirected into a cache, recorded in the received map, guest RAM untouched', async (t) => {
  const p = await pair(t, 2);
  fillPattern(p.src, 3);
  await round(p, 1, [1, 2, 3]);
  const cache = new SharedArrayBuffer(pages * pageBytes);
  const received = new SharedArrayBuffer(pages);
  await p.receiver.setTarget({ ram: false, cache, received });
  const before = Buffer.from(Buffer.from(p.dst.buffer));
  Buffer.from(p.src.buffer).fill(0x99, 10 * pageBytes, 13 * pageBytes);
  await round(p, 2, [10, 11, 12, 15]);
  assert.ok(Buffer.from(p.dst.buffer).equals(before), 'guest RAM unchanged');
  const c = Buffer.from(cache);
  assert.ok(c.subarray(10 * pageBytes, 13 * pageBytes).every((b) => b === 0x99));
  assert.equal(c[15 * pageBytes], 0); // page 15 is a zero page (15 % 3 === 0)
  const rec = new Uint8Array(received);
  assert.deepEqual([...rec.keys()].filter((i) => rec[i] === 1), [10, 11, 12, 15]);
});

test('COLO hook: redirecting pages settles once the receiver is destroyed (a yank at the hand-off must not hang the secondary\'s start, nor a takeover waiting for it)', async (t) => {
  const id = new Uint8Array(crypto.randomBytes(16));
  const ramPages = new SharedArrayBuffer(4);
  new Int32Array(ramPages)[0] = pages;
  const target = (): PageTarget => ({ ram: false, cache: new SharedArrayBuffer(pages * pageBytes), received: new SharedArrayBuffer(pages) });
  const receiver = await MultifdReceiver.start({ memory: memory(), host: '127.0.0.1', migrationId: id, channels: 2, pagesMax: pages, ramPages, ramMaybeNonZero: null, target: { ram: true, cache: null, received: null } });
  t.after(() => receiver.destroy());
  // Asked while the threads are being ended: they may never answer.
  const inFlight = receiver.setTarget(target());
  await receiver.destroy();
  await withTimeout(inFlight, 3000, 'a page target asked for while the receiver was destroyed to settle');
  // Asked after: no thread is left to answer.
  await withTimeout(receiver.setTarget(target()), 3000, 'a page target asked for after the receiver was destroyed to settle');
});

test('a channel of another migration is refused; the right one is still accepted', async (t) => {
  const id = new Uint8Array(crypto.randomBytes(16));
  const ramPages = new SharedArrayBuffer(4);
  new Int32Array(ramPages)[0] = pages;
  const receiver = await MultifdReceiver.start({ memory: memory(), host: '127.0.0.1', migrationId: id, channels: 1, pagesMax: pages, ramPages, ramMaybeNonZero: null, target: { ram: true, cache: null, received: null } });
  t.after(() => receiver.destroy());
  const other = new Uint8Array(crypto.randomBytes(16));
  const s = net.connect({ host: '127.0.0.1', port: receiver.ports[0]! }, () => s.write(encodeChannelHello({ version: multifdVersion, migrationId: other, channel: 0, channels: 1 })));
  t.after(() => s.destroy());
  const status = await withTimeout(new Promise<number>((resolve, reject) => {
    let got = Buffer.alloc(0);
    s.on('data', (d: Buffer) => (got = Buffer.concat([got, d])));
    s.on('close', () => (got.byteLength >= 16 ? resolve(decodeChannelAnswer(got)) : reject(new Error('no answer'))));
    s.on('error', reject);
  }), 5000, "the receiver's answer to a channel of another migration, and its close");
  assert.equal(status, ChannelStatus.wrongMigration);
  await assert.rejects(
    MultifdSender.connect({ memory: memory(), host: '127.0.0.1', ports: receiver.ports, migrationId: other, pagesMax: pages, shadow: null }),
    /refused multifd channel 0: the channel belongs to another migration/,
  );
  const good = await MultifdSender.connect({ memory: memory(), host: '127.0.0.1', ports: receiver.ports, migrationId: id, pagesMax: pages, shadow: null });
  t.after(() => good.destroy());
  const barrier = receiver.barrier(1, 1);
  const sent = await good.sendRound(1, (l) => {
    l[0] = 3;
    return 1;
  }, 0);
  assert.equal(sent.channels, 1);
  const got = await withTimeout(barrier, 5000, 'the barrier of round 1 on the accepted channel');
  assert.equal(got.pages, 1, 'the accepted channel carried the round');
  // An empty round wakes no channel; its barrier (0 channels) passes at once.
  assert.equal((await good.sendRound(2, () => 0, 0)).channels, 0);
  assert.deepEqual(await receiver.barrier(2, 0), { pages: 0, bytes: 0 });
});

test('packet headers are checked against the limits before the payload is read', () => {
  const b = Buffer.alloc(packetHeaderBytes);
  const ok = { flags: 0, channel: 0, packet: 0, round: 1, normal: 1, zero: 1, payloadBytes: payloadBytesOf(1, 1), numbersChecksum: 5n, dataChecksum: 6n };
  encodePacketHeader(b, 0, ok);
  assert.deepEqual(decodePacketHeader(b, 0), ok);
  const bad = (h: Partial<typeof ok>, code: string): void => {
    encodePacketHeader(b, 0, { ...ok, ...h });
    assert.throws(() => decodePacketHeader(b, 0), (e: unknown) => e instanceof StreamError && e.code === code, JSON.stringify(h));
  };
  bad({ normal: limits.pagesPerPacketMax + 1, payloadBytes: payloadBytesOf(limits.pagesPerPacketMax + 1, 1) }, 'FRAME_TOO_LARGE');
  bad({ zero: limits.multifdZeroPagesPerPacketMax + 1 }, 'FRAME_TOO_LARGE');
  bad({ payloadBytes: 12 }, 'FRAME_INVALID');
  bad({ flags: 1 }, 'FRAME_INVALID'); // SYNC with pages
  bad({ flags: 4 }, 'FRAME_INVALID');
  encodePacketHeader(b, 0, ok);
  b[20] = b[20]! ^ 1;
  assert.throws(() => decodePacketHeader(b, 0), (e: unknown) => e instanceof StreamError && e.code === 'FRAME_CHECKSUM');
});

test('a page sent again in the next round on another channel ends with the newer copy, whichever channel is late', async (t) => {
  // The source starts round n+1 once it wrote round n's SYNCs, so one channel can carry round
  // n+1 while another still holds round n. Here channel 0 brings round 2's copy of page 5
  // before channel 1 brings round 1's: the receiver must not apply round 2 before round 1
  // passed its barrier, or the older copy lands last.
  const id = new Uint8Array(crypto.randomBytes(16));
  const dst = memory();
  const ramPages = new SharedArrayBuffer(4);
  new Int32Array(ramPages)[0] = pages;
  const receiver = await MultifdReceiver.start({ memory: dst, host: '127.0.0.1', migrationId: id, channels: 2, pagesMax: pages, ramPages, ramMaybeNonZero: null, target: { ram: true, cache: null, received: null } });
  t.after(() => receiver.destroy());
  const packetNo = [0, 0];
  const packet = (channel: number, round: number, page: number | null, fill: number): Buffer =>
    page === null
      ? encodePacket({ flags: PacketFlags.sync, channel, packet: packetNo[channel]!++, round }, [], 0, Buffer.alloc(0))
      : encodePacket({ flags: 0, channel, packet: packetNo[channel]!++, round }, [page], 1, Buffer.alloc(pageBytes, fill));
  const connected: net.Socket[] = [];
  t.after(() => connected.forEach((s) => s.destroy()));
  const sockets = await withTimeout(Promise.all(
    [0, 1].map(
      (channel) =>
        new Promise<net.Socket>((resolve, reject) => {
          const s = net.connect({ host: '127.0.0.1', port: receiver.ports[channel]! }, () => s.write(encodeChannelHello({ version: multifdVersion, migrationId: id, channel, channels: 2 })));
          connected.push(s);
          s.once('data', (d: Buffer) => (decodeChannelAnswer(d) === ChannelStatus.accepted ? resolve(s) : reject(new Error(`channel ${channel} refused`))));
          s.on('error', reject);
        }),
    ),
  ), 5000, "the receiver's answers to both channels' hellos");
  const [a, b] = sockets as [net.Socket, net.Socket];
  const page5 = (): number => Buffer.from(dst.buffer)[5 * pageBytes]!;
  // Channel 0: its share of round 1 (page 6), then round 2's copy of page 5.
  a.write(Buffer.concat([packet(0, 1, 6, 0x66), packet(0, 1, null, 0), packet(0, 2, 5, 0x22), packet(0, 2, null, 0)]));
  const barrier1 = receiver.barrier(1, 2);
  await waitFor('channel 0 to apply its page of round 1', () => Buffer.from(dst.buffer)[6 * pageBytes] === 0x66, 5000);
  await new Promise((r) => setTimeout(r, 100)); // room for a wrong early apply of round 2
  assert.equal(page5(), 0, 'round 2 is not applied before round 1 passed its barrier');
  // Channel 1, late: round 1's (older) copy of page 5.
  b.write(Buffer.concat([packet(1, 1, 5, 0x11), packet(1, 1, null, 0)]));
  assert.deepEqual(await withTimeout(barrier1, 5000, 'the barrier of round 1'), { pages: 2, bytes: 2 * (2 * packetHeaderBytes) + 2 * payloadBytesOf(1, 0) });
  await withTimeout(receiver.barrier(2, 1), 5000, 'the barrier of round 2');
  assert.equal(page5(), 0x22, 'page 5 holds round 2\'s copy');
});

/** Connect to `port`; resolves once connected, with a promise of the connection's close (the receiver closing it). */
async function idleConnection(t: { after(fn: () => unknown): void }, port: number): Promise<{ socket: net.Socket; closed: Promise<void>; isClosed: () => boolean }> {
  const socket = net.connect({ host: '127.0.0.1', port });
  t.after(() => socket.destroy());
  let closedFlag = false;
  const closed = new Promise<void>((resolve) => socket.once('close', () => {
    closedFlag = true;
    resolve();
  }));
  socket.on('error', () => undefined);
  await withTimeout(new Promise<void>((resolve) => socket.once('connect', () => resolve())), 5000, `connecting to the multifd port ${port}`);
  return { socket, closed, isClosed: () => closedFlag };
}

for (const copyReads of [false, true]) {
  test(`a connection to a multifd port that never sends its hello is closed after the hello timeout, also one that sent part of it (${copyReads ? "'data' event reads" : 'user-buffer reads'})`, async (t) => {
    const saved = process.env.COLO_MULTIFD_COPY_READS;
    if (copyReads) process.env.COLO_MULTIFD_COPY_READS = '1';
    let receiver: MultifdReceiver;
    try {
      receiver = await MultifdReceiver.spawn({ memory: memory(), host: '127.0.0.1', channels: 1, pagesMax: pages, ramPages: new SharedArrayBuffer(4), helloTimeoutMs: 300 });
    } finally {
      if (saved === undefined) delete process.env.COLO_MULTIFD_COPY_READS;
      else process.env.COLO_MULTIFD_COPY_READS = saved;
    }
    t.after(() => receiver.destroy());
    const silent = await idleConnection(t, receiver.ports[0]!);
    const partial = await idleConnection(t, receiver.ports[0]!);
    partial.socket.write(Buffer.alloc(5));
    const start = performance.now();
    await withTimeout(Promise.all([silent.closed, partial.closed]), 5000, 'the receiver to close connections that sent no (whole) hello within its 300 ms hello timeout');
    const ms = performance.now() - start;
    assert.ok(ms >= 200, `closed by the hello timeout, not at once: ${ms.toFixed(0)} ms`);
  });
}

test('idle connections past the cap on a multifd port close the oldest: the source\'s channel is still accepted and carries its round', async (t) => {
  const id = new Uint8Array(crypto.randomBytes(16));
  const ramPages = new SharedArrayBuffer(4);
  new Int32Array(ramPages)[0] = pages;
  const receiver = await MultifdReceiver.start({
    memory: memory(), host: '127.0.0.1', migrationId: id, channels: 1, pagesMax: pages, ramPages, ramMaybeNonZero: null,
    target: { ram: true, cache: null, received: null }, helloTimeoutMs: 60000, pendingConnectionsMax: 2,
  });
  t.after(() => receiver.destroy());
  const idle: Awaited<ReturnType<typeof idleConnection>>[] = [];
  for (let i = 0; i < 3; i++) idle.push(await idleConnection(t, receiver.ports[0]!));
  await waitFor('the receiver to close one of three idle connections (cap 2)', () => idle.filter((c) => c.isClosed()).length === 1, 5000);
  // The source's channel comes on top of two idle ones: another is closed for it.
  const sender = await withTimeout(
    MultifdSender.connect({ memory: memory(), host: '127.0.0.1', ports: receiver.ports, migrationId: id, pagesMax: pages, shadow: null }),
    5000,
    "the source's channel to be accepted past the idle connections",
  );
  t.after(() => sender.destroy());
  await waitFor('the receiver to close a second idle connection for the channel', () => idle.filter((c) => c.isClosed()).length === 2, 5000);
  const barrier = receiver.barrier(1, 1);
  await sender.sendRound(1, (l) => {
    l[0] = 5;
    return 1;
  }, 0);
  assert.equal((await withTimeout(barrier, 5000, 'the barrier of round 1 on the accepted channel')).pages, 1);
});
