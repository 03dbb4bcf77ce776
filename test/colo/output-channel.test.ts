/**
 * The SVM output channel's listener lives in the secondary's vCPU thread, whose event loop runs
 * only while the vCPU is paused. A primary that connected and said hello while the thread was
 * blocked must still get the channel at the next turn of the loop, even when the listener's
 * time ran out meanwhile (a first checkpoint later than that time: QEMU's default delay is 20 s).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { Worker } from 'node:worker_threads';
import { OutputListener } from '../../src/colo/output-channel.js';
import { withTimeout, sleep } from '../framework/harness.js';

const magic = Buffer.from('COLOOUT1', 'latin1');

/** Block this thread (as the vCPU's is while the guest waits) for `ms`. */
function blockThread(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

test('output channel: a primary that connects and says hello while the listening thread is blocked past the timeout still gets the channel', async (t) => {
  const id = new Uint8Array(16).fill(7);
  const l = await OutputListener.open('127.0.0.1', id, 200);
  t.after(() => l.close());
  // Another thread plays the primary: it connects and sends its hello while this one is blocked.
  const hello = Buffer.concat([magic, Buffer.from(id)]);
  const w = new Worker(
    `const net = require('node:net'); const { workerData, parentPort } = require('node:worker_threads');
     const s = net.connect(workerData.port, '127.0.0.1', () => s.write(Buffer.from(workerData.hello), () => parentPort.postMessage('sent')));
     s.on('error', () => {}); parentPort.on('message', () => { s.destroy(); process.exit(0); });`,
    { eval: true, workerData: { port: l.port, hello } },
  );
  t.after(() => w.terminate());
  let sent = false;
  w.on('message', () => (sent = true));
  blockThread(1500);
  const s = await withTimeout(l.accepted, 5000, 'the listener to settle');
  assert.ok(sent, 'the hello was sent while this thread was blocked');
  assert.notEqual(s, null, 'the connection that waited in the kernel became the channel');
  s?.destroy();
});

test('output channel: a connection accepted before the block whose hello arrived during it is kept', async (t) => {
  const id = new Uint8Array(16).fill(9);
  const l = await OutputListener.open('127.0.0.1', id, 200);
  t.after(() => l.close());
  const c = net.connect(l.port, '127.0.0.1');
  c.on('error', () => undefined);
  t.after(() => c.destroy());
  await new Promise<void>((resolve) => c.once('connect', () => resolve()));
  await sleep(50); // the listener has accepted it: its own hello timer runs
  c.write(Buffer.concat([magic, Buffer.from(id)]));
  blockThread(600);
  const s = await withTimeout(l.accepted, 5000, 'the listener to settle');
  assert.notEqual(s, null, 'the hello that arrived while the thread was blocked was read before the time was judged');
  s?.destroy();
});

test('output channel: no primary in time: the listener gives up (output stays on the main channel)', async (t) => {
  const l = await OutputListener.open('127.0.0.1', new Uint8Array(16), 100);
  t.after(() => l.close());
  assert.equal(await withTimeout(l.accepted, 5000, 'the listener to give up'), null);
  // And a wrong hello is not a channel.
  const l2 = await OutputListener.open('127.0.0.1', new Uint8Array(16).fill(1), 2000);
  t.after(() => l2.close());
  const c = net.connect(l2.port, '127.0.0.1');
  c.on('error', () => undefined);
  t.after(() => c.destroy());
  c.write(Buffer.concat([magic, Buffer.alloc(16, 2)]));
  let closed = false;
  c.on('close', () => (closed = true));
  c.resume();
  for (let i = 0; i < 100 && !closed; i++) await sleep(20);
  assert.ok(closed, 'a connection with another id is closed');
});
