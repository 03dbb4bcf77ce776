/**
 * A destination facing a source that breaks the protocol in ways a proxy cannot make: it
 * vanishes inside a round's barrier, ends a multifd channel cleanly before its SYNC, never says
 * hello, lists zero pages out of order, or is refused before its multifd channels are used.
 * The real IncomingMigration runs in-process against a scripted source on loopback; each case
 * must end the migration with a typed error (never wait for ever) and leave no thread behind.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import crypto from 'node:crypto';
import { machineFor } from '../framework/machine.js';
import { TestEnv, guests, waitFor, withTimeout } from '../framework/harness.js';
import type { Machine } from '../../src/machine/machine.js';
import { IncomingMigration } from '../../src/migration/destination.js';
import { MultifdReceiver } from '../../src/migration/multifd.js';
import { FrameDecoder, FrameEncoder, FrameType, encodeIndexList, encodePreamble, parseJsonPayload, type Frame } from '../../src/migration/stream.js';
import { setupOf } from '../../src/migration/sections.js';
import { encodeChannelHello, encodePacket, multifdVersion } from '../../src/migration/multifd-format.js';
import { fl64Module } from '../../src/migration/checksum.js';
import { limits } from '../../src/core/limits.js';

const pageBytes = limits.pageBytes;

interface Dest {
  inc: IncomingMigration;
  port: number;
  ended: string[];
  receivers: MultifdReceiver | null;
}

async function destination(t: { after(fn: () => unknown): void }, m: Machine, opts: { channels: number; helloTimeoutMs?: number }): Promise<Dest> {
  const ended: string[] = [];
  const multifd = opts.channels > 0;
  const receivers = multifd ? await MultifdReceiver.spawn({ memory: m.memory, host: '127.0.0.1', channels: opts.channels, pagesMax: (m.maximumPages * limits.wasmPageBytes) / pageBytes, ramPages: new SharedArrayBuffer(4) }) : null;
  const inc = new IncomingMigration(
    {
      machine: m,
      startRunning: async () => {
        ended.push('ran');
      },
      event: () => undefined,
      ended: (status, message) => ended.push(`${status}: ${message}`),
    },
    { host: '127.0.0.1', port: 0, capabilities: { multifd, 'x-colo': false, 'return-path': false, events: false }, receivers, ...(opts.helloTimeoutMs === undefined ? {} : { helloTimeoutMs: opts.helloTimeoutMs }) },
  );
  t.after(() => inc.close());
  const { port } = await inc.listen();
  return { inc, port, ended, receivers };
}

/** A source that writes frames by hand and reads the destination's replies. */
class ScriptedSource {
  private readonly enc = new FrameEncoder();
  private readonly dec = new FrameDecoder();
  private readonly replies: Frame[] = [];
  readonly id = crypto.randomBytes(16);

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.dec.push(d);
      for (let f = this.dec.next(); f !== null; f = this.dec.next()) this.replies.push(f);
    });
    socket.on('error', () => undefined);
    socket.write(encodePreamble());
  }

  static async connect(t: { after(fn: () => unknown): void }, port: number): Promise<ScriptedSource> {
    const s = net.connect(port, '127.0.0.1');
    t.after(() => s.destroy());
    await withTimeout(new Promise<void>((resolve, reject) => {
      s.once('connect', resolve);
      s.once('error', reject);
    }), 5000, 'the scripted source to connect');
    return new ScriptedSource(s);
  }

  json(type: number, value: unknown): void {
    for (const b of this.enc.json(type, value)) this.socket.write(b);
  }

  frame(type: number, parts: Uint8Array[]): void {
    for (const b of this.enc.frame(type, parts)) this.socket.write(b);
  }

  hello(channels: number): void {
    this.json(FrameType.hello, { version: 1, migrationId: this.id.toString('hex'), channels, capabilities: { multifd: channels > 0 } });
  }

  async reply(): Promise<Record<string, unknown>> {
    await waitFor("the destination's reply", () => this.replies.length > 0, 5000);
    return parseJsonPayload(this.replies.shift()!);
  }

  /** A multifd channel, handshake done. */
  async channel(t: { after(fn: () => unknown): void }, port: number, ch: number, channels: number): Promise<net.Socket> {
    const c = net.connect(port, '127.0.0.1');
    t.after(() => c.destroy());
    await withTimeout(new Promise<void>((resolve, reject) => {
      c.once('connect', resolve);
      c.once('error', reject);
    }), 5000, `multifd channel ${ch} to connect`);
    c.on('error', () => undefined);
    c.write(encodeChannelHello({ version: multifdVersion, migrationId: this.id, channel: ch, channels }));
    return c;
  }
}

/** A source past hello and setup, with its one multifd channel connected and greeted. */
async function readyWithOneChannel(t: { after(fn: () => unknown): void }, d: Dest, m: Machine): Promise<{ src: ScriptedSource; channel: net.Socket }> {
  const src = await ScriptedSource.connect(t, d.port);
  src.hello(1);
  src.json(FrameType.setup, setupOf(m));
  const ready = await src.reply();
  assert.equal(ready.kind, 'ready');
  return { src, channel: await src.channel(t, (ready.channelPorts as number[])[0]!, 0, 1) };
}

const failedWith = (d: Dest, code: string) => waitFor(`the migration to fail with ${code}`, () => d.ended.find((e) => e.startsWith('failed: ') && e.endsWith(`[${code}]`)), 10000);

test('a source that vanishes after a round end, before any SYNC: the barrier fails, the migration ends', async (t) => {
  const { m } = await machineFor(t, guests.spin, []);
  const d = await destination(t, m, { channels: 1 });
  const src = await ScriptedSource.connect(t, d.port);
  src.hello(1);
  src.json(FrameType.setup, setupOf(m));
  assert.equal((await src.reply()).kind, 'ready');
  src.json(FrameType.roundEnd, { round: 1, pages: 0, blocks: 0, channels: 1 });
  await waitFor('the destination to wait in the barrier', () => (d.inc.core.phase === 'barrier' ? true : undefined), 5000);
  src.socket.destroy();
  await failedWith(d, 'CHANNEL_CLOSED');
  assert.equal(d.inc.core.phase, 'failed');
  assert.ok(!d.ended.includes('ran'));
});

test('a multifd channel that ends cleanly inside a round, before its SYNC: STREAM_TRUNCATED, not a wait for ever', async (t) => {
  const { m } = await machineFor(t, guests.spin, []);
  const d = await destination(t, m, { channels: 1 });
  const { src, channel: c } = await readyWithOneChannel(t, d, m);
  c.write(encodePacket({ flags: 0, channel: 0, packet: 0, round: 1 }, [10], 1, Buffer.alloc(pageBytes, 0x55), fl64Module()));
  src.json(FrameType.roundEnd, { round: 1, pages: 1, blocks: 0, channels: 1 });
  c.end(); // a FIN at a packet boundary; the main channel stays open
  await failedWith(d, 'STREAM_TRUNCATED');
  assert.match(d.ended.join('\n'), /multifd channel 0 ended before the end of round 1/);
});

/** Round 1's first packet on channel `c`, cut inside its page data (a channel dropped mid-packet). */
function cutPacket(c: net.Socket): void {
  const packet = encodePacket({ flags: 0, channel: 0, packet: 0, round: 1 }, [10, 11], 2, Buffer.alloc(2 * pageBytes, 0x55), fl64Module());
  c.end(packet.subarray(0, packet.byteLength - pageBytes));
}

const cancelled = (d: Dest) => waitFor('the migration to end as cancelled', () => d.ended.find((e) => e.startsWith('cancelled: ')), 10000);

test('regression: a cancel while the destination waits in a round barrier (a multifd source cut mid-packet, its abort queued on the main channel before its end): cancelled, not CHANNEL_CLOSED', async (t) => {
  const { m } = await machineFor(t, guests.spin, []);
  const d = await destination(t, m, { channels: 1 });
  const { src, channel: c } = await readyWithOneChannel(t, d, m);
  src.json(FrameType.roundEnd, { round: 1, pages: 2, blocks: 0, channels: 1 });
  await waitFor('the destination to wait in the barrier', () => (d.inc.core.phase === 'barrier' ? true : undefined), 5000);
  // As SourceSession.abort: the abort and the end on the main channel, the multifd channel dropped.
  src.json(FrameType.abort, { reason: 'cancelled on the source' });
  src.socket.end();
  cutPacket(c);
  assert.equal(await cancelled(d), 'cancelled: the source cancelled the migration (cancelled on the source)');
  assert.equal(d.inc.core.phase, 'cancelled');
  assert.ok(!d.ended.includes('ran'));
  assert.equal(d.ended.length, 1, d.ended.join('\n'));
});

test('regression: a cancel whose cut multifd channel the destination sees before the abort on the main channel: cancelled, not STREAM_TRUNCATED', async (t) => {
  const { m } = await machineFor(t, guests.spin, []);
  const d = await destination(t, m, { channels: 1 });
  const { src, channel: c } = await readyWithOneChannel(t, d, m);
  cutPacket(c);
  await waitFor('the multifd receiver to see the cut', () => d.inc.session?.receiverFailure ?? undefined, 5000);
  await new Promise((r) => setTimeout(r, 200)); // the main channel says why a moment later
  assert.equal(d.inc.core.phase, 'rounds', 'the cut alone does not end the migration at once');
  src.json(FrameType.abort, { reason: 'cancelled on the source' });
  src.socket.end();
  assert.equal(await cancelled(d), 'cancelled: the source cancelled the migration (cancelled on the source)');
  assert.equal(d.ended.length, 1, d.ended.join('\n'));
});

test('a source that crashes in a round barrier (a multifd channel cut mid-packet, the main channel closed without an abort): failed', async (t) => {
  const { m } = await machineFor(t, guests.spin, []);
  const d = await destination(t, m, { channels: 1 });
  const { src, channel: c } = await readyWithOneChannel(t, d, m);
  src.json(FrameType.roundEnd, { round: 1, pages: 2, blocks: 0, channels: 1 });
  await waitFor('the destination to wait in the barrier', () => (d.inc.core.phase === 'barrier' ? true : undefined), 5000);
  cutPacket(c);
  src.socket.destroy();
  // The barrier sees the main channel's end or the channel's cut first: either names a break.
  const e = await waitFor('the migration to end', () => d.ended[0], 10000);
  assert.match(e, /^failed: .*\[(CHANNEL_CLOSED|STREAM_TRUNCATED)\]$/);
  assert.equal(d.inc.core.phase, 'failed');
  assert.equal(d.ended.length, 1, d.ended.join('\n'));
});

test('a multifd channel whose error comes just after the main channel closed, with the destination in a round barrier: the channel\'s error, not CHANNEL_CLOSED', async (t) => {
  const { m } = await machineFor(t, guests.spin, []);
  const d = await destination(t, m, { channels: 1 });
  const { src, channel: c } = await readyWithOneChannel(t, d, m);
  src.json(FrameType.roundEnd, { round: 1, pages: 1, blocks: 0, channels: 1 });
  await waitFor('the destination to wait in the barrier', () => (d.inc.core.phase === 'barrier' ? true : undefined), 5000);
  src.socket.end();
  // The channel's verdict on its packet (numbered 1 where 0 was due) follows the main
  // channel's end, as one that was on its way from the worker does.
  await new Promise((r) => setTimeout(r, 100));
  c.write(encodePacket({ flags: 0, channel: 0, packet: 1, round: 1 }, [10], 1, Buffer.alloc(pageBytes, 0x55), fl64Module()));
  const e = await waitFor('the migration to end', () => d.ended[0], 10000);
  assert.match(e, /^failed: multifd channel 0: packet number 1 where 0 was expected .*\[FRAME_ORDER\]$/);
  assert.equal(d.ended.length, 1, d.ended.join('\n'));
});

test('a multifd channel that fails inside a round the destination waits for: its own error at once, not \'ended before the end of round\' after the wait for an abort', async (t) => {
  const { m } = await machineFor(t, guests.spin, []);
  const d = await destination(t, m, { channels: 1 });
  const { src, channel: c } = await readyWithOneChannel(t, d, m);
  src.json(FrameType.roundEnd, { round: 1, pages: 1, blocks: 0, channels: 1 });
  await waitFor('the destination to wait in the barrier', () => (d.inc.core.phase === 'barrier' ? true : undefined), 5000);
  const sent = performance.now();
  c.write(encodePacket({ flags: 0, channel: 1, packet: 0, round: 1 }, [10], 1, Buffer.alloc(pageBytes, 0x55), fl64Module()));
  const e = await waitFor('the migration to end', () => d.ended[0], 10000);
  const tookMs = performance.now() - sent;
  assert.match(e, /^failed: multifd channel 0: packet 0 names channel 1 \[FRAME_INVALID\]$/);
  // A corrupt packet is no cancel: nothing to look for on the main channel, which stays open.
  assert.ok(tookMs < limits.multifdBreakAbortWaitMs, `failed after ${Math.round(tookMs)} ms, not after the ${limits.multifdBreakAbortWaitMs} ms wait for an abort`);
  assert.equal(d.ended.length, 1, d.ended.join('\n'));
});

test('a peer that connects and never says hello is dropped after the hello timeout', async (t) => {
  const { m } = await machineFor(t, guests.spin, []);
  const d = await destination(t, m, { channels: 0, helloTimeoutMs: 300 });
  const silent = net.connect(d.port, '127.0.0.1');
  t.after(() => silent.destroy());
  silent.on('error', () => undefined);
  silent.resume(); // read (and drop) the preamble, so that the destination's close is seen
  let closed = false;
  silent.once('close', () => (closed = true));
  await failedWith(d, 'HANDSHAKE_TIMEOUT');
  assert.match(d.ended.join('\n'), /sent no hello within 300 ms/);
  await waitFor('the silent connection to be closed by the destination', () => closed, 5000);
});

test('a source that says hello and then nothing is dropped after the handshake timeout, as one that never says hello', async (t) => {
  const { m } = await machineFor(t, guests.spin, []);
  const d = await destination(t, m, { channels: 0, helloTimeoutMs: 300 });
  const src = await ScriptedSource.connect(t, d.port);
  let closed = false;
  src.socket.once('close', () => (closed = true));
  src.hello(0);
  await failedWith(d, 'HANDSHAKE_TIMEOUT');
  assert.match(d.ended.join('\n'), /sent a hello but no setup within 300 ms/);
  assert.equal(d.inc.core.phase, 'failed');
  assert.equal((await src.reply()).kind, 'error', 'the source is told why');
  await waitFor('the connection to be closed by the destination', () => closed, 5000);
});

test('zero pages listed out of order: exactly the listed pages are zeroed', async (t) => {
  const { m } = await machineFor(t, guests.spin, []);
  const d = await destination(t, m, { channels: 1 });
  const { src, channel: c } = await readyWithOneChannel(t, d, m);
  const fl = fl64Module();
  const pages = m.ram().byteLength / pageBytes;
  const [p, q] = [pages - 1, pages - 40];
  // Round 1: data in pages q+1 and p.
  c.write(encodePacket({ flags: 0, channel: 0, packet: 0, round: 1 }, [q + 1, p], 2, Buffer.alloc(2 * pageBytes, 0x55), fl));
  c.write(encodePacket({ flags: 1, channel: 0, packet: 1, round: 1 }, [], 0, Buffer.alloc(0), fl));
  src.json(FrameType.roundEnd, { round: 1, pages: 2, blocks: 0, channels: 1 });
  // Round 2: sixteen zero pages, [q, p, q+2 .. q+15]: first and last are sixteen apart, but
  // q+1 is not listed (it keeps its data) and p is (it is zeroed).
  const zeros = [q, p, ...Array.from({ length: 14 }, (_, i) => q + 2 + i)];
  c.write(encodePacket({ flags: 0, channel: 0, packet: 2, round: 2 }, zeros, 0, Buffer.alloc(0), fl));
  c.write(encodePacket({ flags: 1, channel: 0, packet: 3, round: 2 }, [], 0, Buffer.alloc(0), fl));
  src.json(FrameType.roundEnd, { round: 2, pages: 16, blocks: 0, channels: 1 });
  await waitFor('round 2 to pass its barrier', () => (d.inc.core.stats.dirtySyncCount >= 2 ? true : undefined), 5000);
  const ram = m.ram();
  assert.equal(ram[p * pageBytes], 0, 'the listed page is zeroed');
  assert.equal(ram[(q + 1) * pageBytes], 0x55, 'the page not listed keeps its data');
});

test('a source refused at setup: the spare multifd receivers end with the session', async (t) => {
  const { m } = await machineFor(t, guests.spin, []);
  const d = await destination(t, m, { channels: 2 });
  const src = await ScriptedSource.connect(t, d.port);
  src.hello(2);
  src.json(FrameType.setup, { ...setupOf(m), moduleHash: 'ff'.repeat(32) });
  const r = await src.reply();
  assert.equal(r.kind, 'error');
  await failedWith(d, 'STATE_WRONG_MODULE');
  // The receivers' ports were announced nowhere, but their threads listened: they must be gone.
  const ports = d.receivers!.ports;
  assert.equal(ports.length, 2);
  for (const port of ports) {
    await waitFor(`multifd port ${port} to stop listening`, () => new Promise<boolean | undefined>((resolve) => {
      const s = net.connect(port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        resolve(undefined);
      });
      s.once('error', () => resolve(true));
    }), 5000);
  }
});

test('a source whose guest instrumentation is another version is refused at setup: its paused call stack would resume with wrong locals', async (t) => {
  const { m } = await machineFor(t, guests.spin, []);
  const d = await destination(t, m, { channels: 0 });
  const src = await ScriptedSource.connect(t, d.port);
  src.hello(0);
  src.json(FrameType.setup, { ...setupOf(m), instrumentVersion: m.guest.instrumentVersion - 1 });
  const r = await src.reply();
  assert.equal(r.kind, 'error');
  assert.match(String(r.message), new RegExp(`guest instrumentation is version ${m.guest.instrumentVersion - 1}, this one's is ${m.guest.instrumentVersion}`));
  await failedWith(d, 'STATE_INSTRUMENT');
  const { instrumentVersion: _v, ...older } = setupOf(m);
  const d2 = await destination(t, m, { channels: 0 });
  const src2 = await ScriptedSource.connect(t, d2.port);
  src2.hello(0);
  src2.json(FrameType.setup, older);
  assert.match(String((await src2.reply()).message), /version unknown/);
  await failedWith(d2, 'STATE_INSTRUMENT');
});

test('disk blocks the destination cannot store (its filesystem is full): a typed DISK_FULL naming the image, told to the source too', async (t) => {
  const env = new TestEnv(t);
  const mnt = await env.tmpfs('small-fs', '1m');
  const image = `${mnt}/dst.img`;
  fs.writeFileSync(image, '');
  fs.truncateSync(image, 8 * 1024 * 1024); // sparse: each block written takes room
  const { m } = await machineFor(t, guests.spin, [], { drive: image });
  const d = await destination(t, m, { channels: 0 });
  const src = await ScriptedSource.connect(t, d.port);
  src.hello(0);
  src.json(FrameType.setup, setupOf(m));
  const ready = await src.reply();
  assert.deepEqual([ready.kind, ready.disk], ['ready', 'full']);
  const per = limits.pagesPerPacketMax;
  // 8 MiB of data blocks for a 1 MiB filesystem.
  for (let first = 0; first < 2048; first += per) {
    const blocks = Array.from({ length: per }, (_, i) => first + i);
    src.frame(FrameType.diskBlocks, [encodeIndexList(blocks), Buffer.alloc(per * limits.diskBlockBytes, 0x5a)]);
  }
  const e = await failedWith(d, 'DISK_FULL');
  assert.match(e, new RegExp(`cannot store disk block \\d+ in '${image}': ENOSPC`));
  const r = await src.reply();
  assert.equal(r.kind, 'error');
  assert.match(String(r.message), /cannot store disk block \d+ in .*ENOSPC/);
  assert.ok(!d.ended.includes('ran'));
});
