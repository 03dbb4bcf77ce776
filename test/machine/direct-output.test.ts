/**
 * The vCPU writing guest output to a socket itself (the COLO secondary's SVM output channel,
 * src/colo/output-channel.ts): kv.wasm answers PINGs; the answers must arrive, tagged with the
 * epoch, on the socket while it is given to the vCPU, and as 'output' events before, after it
 * is taken away, and after it breaks. Real worker thread, real loopback TCP.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { guests, sleep, waitFor } from '../framework/harness.js';
import { machineFor, watGuest } from '../framework/machine.js';
import { ChannelFrameReader, decodeNetBatch, encodeInputFrames, encodeOutputFrames } from '../../src/colo/net-wire.js';
import type { NicOutput } from '../../src/net/nic.js';
import { MachineError, type Machine } from '../../src/machine/machine.js';
import { connectOutputChannel } from '../../src/colo/output-channel.js';

const enc = new TextEncoder();

/** Pause, restore the vCPU's own state (what an apply does), set the output epoch, run. */
async function applyOwnState(m: Machine, epoch: number): Promise<void> {
  await m.pause();
  await m.restoreVcpu(await m.saveVcpu());
  m.setOutputEpoch(epoch);
  await m.cont();
}

test('machine: guest output goes on the output channel from the restore after it connected, tagged with its epoch; back to output events when taken away or broken', async (t) => {
  const { m, serialText } = await machineFor(t, guests.kv, []);
  const events: string[] = [];
  const show = (o: NicOutput): string => (o.kind === 'out' ? `${o.offset}:${Buffer.from(o.bytes).toString('latin1')}` : `${o.offset}:${o.kind}`);
  m.on('output', (o: NicOutput) => events.push(show(o)));
  const failures: string[] = [];
  m.on('direct-output-failed', (msg: string) => failures.push(msg));
  const sockets: net.Socket[] = [];
  t.after(() => sockets.forEach((s) => s.destroy()));
  const onSocket: string[] = [];
  const read = (s: net.Socket): void => {
    const reader = new ChannelFrameReader();
    s.on('data', (chunk: Buffer) => {
      for (const p of reader.push(chunk)) {
        const b = decodeNetBatch(p);
        if (b.type === 'output') for (const o of b.events) onSocket.push(`e${b.epoch} ${show(o)}`);
      }
    });
    s.on('error', () => undefined);
  };
  const closed = (s: net.Socket, what: string): Promise<boolean> => waitFor(what, () => s.destroyed || s.readableEnded, 5000);
  const id = new Uint8Array(16).fill(7);

  await m.cont();
  await waitFor('kv ready on the serial', () => serialText().includes('kv ready'), 10000);
  let seq = 0;
  const ping = (): void => m.injectInput({ seq: ++seq, kind: 'data', conn: 1, bytes: enc.encode('PING\r\n') });
  const offsetOfLast = (): number => (seq - 2) * 7; // seq 1 opened the connection; each PONG is 7 bytes
  m.injectInput({ seq: ++seq, kind: 'open', conn: 1 });
  ping();
  await waitFor('a PONG as an output event', () => events.length >= 1, 5000);
  assert.deepEqual(events, ['0:+PONG\r\n']);
  await assert.rejects(m.openOutputChannel('127.0.0.1', id), MachineError, 'only while the vCPU is paused');

  const apply = (epoch: number): Promise<void> => applyOwnState(m, epoch);
  /** Apply until a PING's answer arrives on the channel (it connects while the vCPU is paused). */
  const applyUntilDirect = async (first: number): Promise<number> => {
    let epoch = first;
    await waitFor('a PONG on the output channel', async () => {
      await apply(++epoch);
      const n = events.length;
      ping();
      await waitFor('the PONG', () => events.length > n || onSocket.some((x) => x.includes(`${offsetOfLast()}:`)), 5000);
      return events.length === n;
    }, 10000, 1);
    return epoch;
  };

  await m.pause();
  const port = await m.openOutputChannel('127.0.0.1', id);
  // Someone else's connection (another migration id) is refused.
  const stranger = await connectOutputChannel('127.0.0.1', port, new Uint8Array(16).fill(9));
  sockets.push(stranger);
  stranger.on('error', () => undefined);
  stranger.resume();
  await m.cont();
  await m.pause(); // the vCPU thread accepts while it is paused
  const ours = await connectOutputChannel('127.0.0.1', port, id);
  sockets.push(ours);
  read(ours);
  await m.cont();
  // Connected, but not at an apply yet: output events still.
  ping();
  await waitFor('a PONG as an output event before the apply', () => events.length >= 2, 5000);
  assert.deepEqual(events, ['0:+PONG\r\n', '7:+PONG\r\n']);
  let epoch = await applyUntilDirect(0);
  await closed(stranger, 'the channel with the wrong hello to be closed by the vCPU thread');
  ping();
  await waitFor('two PONGs on the channel', () => onSocket.length >= 2, 5000);
  assert.deepEqual(onSocket.slice(-2), [`e${epoch} ${offsetOfLast() - 7}:+PONG\r\n`, `e${epoch} ${offsetOfLast()}:+PONG\r\n`]);
  const eventsBefore = events.length;

  // Taken away while the guest runs (a takeover): output events from the next batch on, and
  // the vCPU closes the channel.
  m.stopDirectOutput();
  ping();
  await waitFor('a PONG as an output event again', () => events.length > eventsBefore, 5000);
  assert.equal(events.at(-1), `${offsetOfLast()}:+PONG\r\n`);
  await closed(ours, 'the vCPU to close the channel taken from it');
  await apply(++epoch);
  ping();
  await waitFor('a PONG as an output event after the next apply too', () => events.at(-1) === `${offsetOfLast()}:+PONG\r\n`, 5000);

  // A new channel, then the primary's end goes away: the vCPU finds out on a write, says so,
  // closes it and posts its output again; nothing after that is lost.
  await m.pause();
  const port2 = await m.openOutputChannel('127.0.0.1', id);
  await m.cont();
  const again = await connectOutputChannel('127.0.0.1', port2, id);
  sockets.push(again);
  read(again);
  epoch = await applyUntilDirect(epoch);
  again.resetAndDestroy();
  await waitFor('the vCPU to report the broken output channel', () => {
    ping();
    return failures.length > 0;
  }, 5000, 50);
  assert.match(failures[0]!, /EPIPE|ECONNRESET|broken pipe|reset/i);
  ping();
  await waitFor('the PONGs after the failure as output events', () => events.at(-1) === `${offsetOfLast()}:+PONG\r\n`, 5000);
});

test('machine: a pause does not wait for a primary that reads nothing: the vCPU gives up the full output channel and posts its output', async (t) => {
  const { m, serialText } = await machineFor(t, guests.kv, []);
  let eventBytes = 0;
  const events: string[] = [];
  m.on('output', (o: NicOutput) => {
    if (o.kind !== 'out') return;
    eventBytes += o.bytes.byteLength;
    if (o.bytes.byteLength < 100) events.push(Buffer.from(o.bytes).toString('latin1'));
  });
  const failures: string[] = [];
  m.on('direct-output-failed', (msg: string) => failures.push(msg));
  const id = new Uint8Array(16).fill(3);
  await m.cont();
  await waitFor('kv ready on the serial', () => serialText().includes('kv ready'), 10000);
  let seq = 0;
  const send = (s: string | Uint8Array): void => m.injectInput({ seq: ++seq, kind: 'data', conn: 1, bytes: typeof s === 'string' ? enc.encode(s) : s });
  m.injectInput({ seq: ++seq, kind: 'open', conn: 1 });
  const big = 512 * 1024;
  send(Buffer.concat([Buffer.from(`*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$${big}\r\n`), Buffer.alloc(big, 0x61), Buffer.from('\r\n')]));
  await waitFor('+OK for the 512 KiB SET', () => events.includes('+OK\r\n'), 10000);

  await m.pause();
  const port = await m.openOutputChannel('127.0.0.1', id);
  const primary = await connectOutputChannel('127.0.0.1', port, id);
  t.after(() => primary.destroy());
  primary.on('error', () => undefined);
  let socketBytes = 0;
  primary.on('data', (chunk: Buffer) => (socketBytes += chunk.byteLength));
  await m.cont();
  // Apply (restore the vCPU's own state) until a PONG goes to the channel instead of an event.
  let epoch = 0;
  await waitFor('output on the channel', async () => {
    await applyOwnState(m, ++epoch);
    const before = events.length;
    const onSocket = socketBytes;
    send('PING\r\n');
    await waitFor('the PONG', () => events.length > before || socketBytes > onSocket, 5000);
    return events.length === before;
  }, 10000, 1);

  // The primary stops reading; the guest answers 512 KiB GETs until the socket is full.
  primary.pause();
  for (let i = 0; i < 80; i++) send('GET big\r\n');
  // Far more than the socket holds: the vCPU is soon stuck in a write (the failure below says so).
  await sleep(500);
  const started = performance.now();
  await m.pause();
  const ms = performance.now() - started;
  assert.ok(ms < 2000, `the pause took ${ms.toFixed(0)} ms`);
  assert.equal(failures.length, 1);
  assert.match(failures[0]!, /read nothing for \d+ ms/);
  await m.cont();
  // The rest of the answers come as output events; the channel is closed.
  // `events` holds the short outputs only (not the GET answers), and may already end in a
  // PONG of the loop above: what is awaited is one more entry.
  const shortBefore = events.length;
  send('PING\r\n');
  await waitFor('a PONG as an output event after the GETs', () => events.length > shortBefore && events.at(-1) === '+PONG\r\n', 10000);
  assert.ok(eventBytes > 5 * big, `GET answers posted after the channel was given up: ${eventBytes} bytes`);
  primary.resume();
  await waitFor('the vCPU to close the channel', () => primary.readableEnded || primary.destroyed, 5000);
});

/** Output events and direct-output failures of a machine, as text. */
function watch(m: Machine): { events: string[]; failures: string[] } {
  const events: string[] = [];
  const failures: string[] = [];
  m.on('output', (o: NicOutput) => events.push(o.kind === 'out' ? Buffer.from(o.bytes).toString('latin1') : o.kind));
  m.on('direct-output-failed', (msg: string) => failures.push(msg));
  return { events, failures };
}

/** kv.wasm running and ready, with client connection 1 open (input sequence number `lastSeq`). */
async function kvWithClient(t: Parameters<typeof machineFor>[0]): Promise<{ m: Machine; events: string[]; failures: string[]; lastSeq: number }> {
  const { m, serialText } = await machineFor(t, guests.kv, []);
  const { events, failures } = watch(m);
  await m.cont();
  await waitFor('kv ready on the serial', () => serialText().includes('kv ready'), 10000);
  m.injectInput({ seq: 1, kind: 'open', conn: 1 });
  return { m, events, failures, lastSeq: 1 };
}

/**
 * Give the running vCPU an output channel and play the primary's end of it: connect, then
 * apply (restore the vCPU's own state) until the vCPU says mirror-ready, i.e. it reads input
 * from the channel. The channel's output batches are collected as text.
 */
async function takeChannel(t: { after(fn: () => unknown): void }, m: Machine, idByte: number): Promise<{ primary: net.Socket; onSocket: string[]; mirrorReady: () => number; send(evs: { seq: number; s: string }[]): void }> {
  const id = new Uint8Array(16).fill(idByte);
  await m.pause();
  const port = await m.openOutputChannel('127.0.0.1', id);
  await m.cont();
  await m.pause(); // the vCPU thread accepts while it is paused
  const primary = await connectOutputChannel('127.0.0.1', port, id);
  t.after(() => primary.destroy());
  primary.on('error', () => undefined);
  const onSocket: string[] = [];
  let ready = 0;
  const reader = new ChannelFrameReader();
  primary.on('data', (chunk: Buffer) => {
    for (const p of reader.push(chunk)) {
      const b = decodeNetBatch(p);
      if (b.type === 'mirror-ready') ready++;
      else if (b.type === 'output') for (const o of b.events) onSocket.push(o.kind === 'out' ? Buffer.from(o.bytes).toString('latin1') : o.kind);
    }
  });
  await m.cont();
  let epoch = 0;
  await waitFor('mirror-ready from the vCPU', async () => {
    await applyOwnState(m, ++epoch);
    await sleep(20);
    return ready > 0;
  }, 10000, 1);
  const send = (evs: { seq: number; s: string }[]): void => {
    primary.write(encodeInputFrames(evs.map((e) => ({ seq: e.seq, kind: 'data' as const, conn: 1, bytes: enc.encode(e.s) }))));
  };
  return { primary, onSocket, mirrorReady: () => ready, send };
}

test('machine: the vCPU reads mirrored input from the output channel after its mirror-ready: in order, stale input dropped, the guest clock running while it waits; a takeover stops it', async (t) => {
  const { m, events, failures, lastSeq } = await kvWithClient(t);
  let seq = lastSeq;
  const ring = (s: string): void => m.injectInput({ seq: ++seq, kind: 'data', conn: 1, bytes: enc.encode(s) });
  ring('PING\r\n');
  await waitFor('a PONG as an output event', () => events.length >= 1, 5000);

  const { primary, onSocket, mirrorReady, send } = await takeChannel(t, m, 5);
  assert.equal(mirrorReady(), 1, 'one mirror-ready per channel taken');

  // Input on the channel, several commands in one batch: answered in order, on the channel.
  send([{ seq: ++seq, s: 'SET a 1\r\n' }, { seq: ++seq, s: 'INCR a\r\n' }, { seq: ++seq, s: 'GET a\r\n' }]);
  await waitFor('three answers on the channel', () => onSocket.length >= 3, 5000);
  assert.deepEqual(onSocket, ['+OK\r\n', ':2\r\n', '$1\r\n2\r\n']);
  // Input the NIC already has (a sequence number not above its last) is dropped; the next is taken.
  send([{ seq: seq - 1, s: 'INCR a\r\n' }, { seq: seq, s: 'INCR a\r\n' }, { seq: ++seq, s: 'INCR a\r\n' }]);
  await waitFor('the answer to the new INCR', () => onSocket.length >= 4, 5000);
  await sleep(100);
  assert.deepEqual(onSocket.slice(3), [':3\r\n'], 'stale input dropped, new input taken once');

  // The guest's clock runs while the vCPU waits for the channel in its event loop.
  const time = async (): Promise<number> => {
    const n = onSocket.length;
    send([{ seq: ++seq, s: 'TIME\r\n' }]);
    await waitFor('a TIME answer', () => onSocket.length > n, 5000);
    const parts = onSocket.at(-1)!.split('\r\n').filter((x) => /^\d+$/.test(x));
    return Number(parts[0]) * 1000 + Number(parts[1]) / 1000;
  };
  const t0 = await time();
  await sleep(400);
  const t1 = await time();
  assert.ok(t1 - t0 >= 350, `guest clock advanced ${(t1 - t0).toFixed(0)} ms over 400 ms of waiting for the channel`);

  // Ring input still wakes the guest while it waits on the channel.
  ring('PING\r\n');
  await waitFor('the ring PING answered', () => onSocket.at(-1) === '+PONG\r\n', 5000);

  // A takeover while the guest waits there: the vCPU closes the channel, and ring input is
  // answered as output events again.
  const eventsBefore = events.length;
  m.stopDirectOutput();
  await waitFor('the vCPU to close the channel', () => primary.readableEnded || primary.destroyed, 5000);
  ring('PING\r\n');
  await waitFor('a PONG as an output event after the takeover', () => events.length > eventsBefore, 5000);
  assert.equal(events.at(-1), '+PONG\r\n');
  assert.deepEqual(failures, []);
});

test('machine: bad mirrored input on the output channel closes it; the vCPU goes on with the ring and posts its output', async (t) => {
  const { m, events, failures, lastSeq } = await kvWithClient(t);
  let seq = lastSeq;
  const { primary } = await takeChannel(t, m, 6);
  // An output batch where input belongs.
  primary.write(encodeOutputFrames(1, [{ kind: 'out', conn: 1, offset: 0, bytes: enc.encode('x') }]));
  await waitFor('the vCPU to report the bad input', () => failures.length > 0, 5000);
  assert.match(failures[0]!, /bad mirrored input on the SVM output channel: the primary sent an output batch/);
  await waitFor('the vCPU to close the channel', () => primary.readableEnded || primary.destroyed, 5000);
  m.injectInput({ seq: ++seq, kind: 'data', conn: 1, bytes: enc.encode('PING\r\n') });
  await waitFor('a PONG as an output event', () => events.at(-1) === '+PONG\r\n', 5000);
});

test('machine: a guest timer comes due while the vCPU waits for the output channel in its event loop', async (t) => {
  const tick = new URL('../../../test/machine/fixtures/tick.wasm', import.meta.url).pathname;
  const { m } = await machineFor(t, tick, []);
  const { events, failures } = watch(m);
  let seq = 0;
  m.injectInput({ seq: ++seq, kind: 'open', conn: 1 });
  await m.cont();
  // Waiting on the ring (Atomics.wait), the 40 ms timeout already ticks.
  await waitFor('ticks as output events', () => events.filter((e) => e === 'tick\n').length >= 2, 5000);
  const { onSocket, send } = await takeChannel(t, m, 8);
  // From now on the guest's waits are in the vCPU's event loop: its timeout must still fire,
  // about every 40 ms of guest time (and the guest's clock runs through these waits).
  const before = onSocket.filter((x) => x === 'tick\n').length;
  await sleep(500);
  const ticks = onSocket.filter((x) => x === 'tick\n').length - before;
  t.diagnostic(`${ticks} ticks in 500 ms`);
  assert.ok(ticks >= 6 && ticks <= 14, `${ticks} ticks on the channel in 500 ms (one per 40 ms expected; ${events.length} events, ${onSocket.length} on the socket)`);
  // Input on the channel still wakes it before its timeout.
  send([{ seq: ++seq, s: 'hi' }]);
  await waitFor('the echo on the channel', () => onSocket.includes('echo:hi'), 2000);
  assert.deepEqual(failures, []);
});

test('machine: a guest poll with a timeout beyond a timer\'s range waits quietly in the event loop for the channel: no 1 ms timer loop, and input still wakes it', async (t) => {
  // Accepts on fd 3, then polls its connection and a monotonic clock of 2^64-1 ns (what Rust's
  // sleep(Duration::MAX) asks for); [8] counts the polls that returned, [12] the last event's type.
  const file = watGuest(t, 'forever', `(module
    (import "wasi_snapshot_preview1" "sock_accept" (func $acc (param i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "sock_recv" (func $recv (param i32 i32 i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 1)
    (func (export "_start")
      (drop (call $acc (i32.const 3) (i32.const 0) (i32.const 0)))
      (i32.store8 (i32.const 1024) (i32.const 1))
      (i32.store (i32.const 1032) (i32.load (i32.const 0)))
      (i32.store (i32.const 1080) (i32.const 1))
      (i64.store (i32.const 1088) (i64.const -1))
      (i32.store (i32.const 16) (i32.const 512)) (i32.store (i32.const 20) (i32.const 256))
      (loop $l
        (drop (call $poll (i32.const 1016) (i32.const 2048) (i32.const 2) (i32.const 4)))
        (i32.store (i32.const 12) (i32.load8_u (i32.const 2058)))
        (drop (call $recv (i32.load (i32.const 0)) (i32.const 16) (i32.const 1) (i32.const 0) (i32.const 24) (i32.const 28)))
        (i32.store (i32.const 8) (i32.add (i32.load (i32.const 8)) (i32.const 1)))
        (br $l))))`);
  const { m } = await machineFor(t, file, []);
  const { failures } = watch(m);
  m.injectInput({ seq: 1, kind: 'open', conn: 1 });
  await m.cont();
  const { send } = await takeChannel(t, m, 9);
  const word = (i: number): number => new Uint32Array(m.memory.buffer, 0, 4)[i]!;
  // The process's own CPU time while the guest waits: the 1 ms timer loop (each turn a
  // rewind and unwind of the guest, and a TimeoutOverflowWarning printed) took 230-700 ms of
  // every 1000. The quietest of a few windows is taken: the teardown of earlier tests' machines
  // costs CPU in this process for a while too, but not in every window.
  const windows: number[] = [];
  for (let k = 0; k < 16 && !(windows.length > 0 && Math.min(...windows) < 15); k++) {
    const c0 = process.cpuUsage();
    await sleep(250);
    const c = process.cpuUsage(c0);
    windows.push((c.user + c.system) / 1000);
  }
  t.diagnostic(`ms of CPU per 250 ms of waiting: ${windows.map((x) => x.toFixed(0)).join(' ')}`);
  assert.ok(Math.min(...windows) < 15, `the process used at least ${Math.min(...windows).toFixed(0)} ms of CPU in each 250 ms while the guest waited`);
  assert.equal(word(2), 0, 'the poll has not returned (its timeout is far away)');
  send([{ seq: 2, s: 'hi' }]);
  await waitFor('the poll to return for the input on the channel', () => word(2) === 1, 5000);
  assert.equal(word(3), 1, 'an fd_read event');
  assert.deepEqual(failures, []);
});
