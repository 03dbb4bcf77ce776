/**
 * The vCPU writing guest output to a socket itself (the COLO secondary's SVM output channel,
 * src/colo/output-channel.ts): kv.wasm answers PINGs; the answers must arrive, tagged with the
 * epoch, on the socket while it is given to the vCPU, and as 'output' events before, after it
 * is taken away, and after it breaks. Real worker thread, real loopback TCP.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { guests, waitFor } from '../framework/harness.js';
import { machineFor } from '../framework/machine.js';
import { OutputFrameReader, decodeNetBatch } from '../../src/colo/net-wire.js';
import type { NicOutput } from '../../src/net/nic.js';
import { MachineError } from '../../src/machine/machine.js';
import { connectOutputChannel } from '../../src/colo/output-channel.js';

const enc = new TextEncoder();

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
    const reader = new OutputFrameReader();
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

  /** Pause, restore the vCPU's own state (what an apply does), set the epoch, run. */
  const apply = async (epoch: number): Promise<void> => {
    await m.pause();
    await m.restoreVcpu(await m.saveVcpu());
    m.setOutputEpoch(epoch);
    await m.cont();
  };
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
