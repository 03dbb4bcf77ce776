/**
 * The front end stops reading its clients for more than one reason at a time (a paused VM, the
 * COLO compare's bound on held output): lifting one reason must not lift the other. Real
 * client sockets on loopback.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { FrontEnd } from '../../src/net/frontend.js';
import type { NicInput } from '../../src/net/nic.js';
import { waitFor } from '../framework/harness.js';
import { limits } from '../../src/core/limits.js';

/**
 * A front end on a free port of 127.0.0.1 whose guest input goes to `events`, and one client of
 * it (`setUp` runs on its socket at once), once its open came; both are closed after the test.
 */
async function frontEndWithClient(t: TestContext, setUp?: (client: net.Socket) => void): Promise<{ fe: FrontEnd; events: NicInput[]; client: net.Socket }> {
  const events: NicInput[] = [];
  const fe = new FrontEnd({ host: '127.0.0.1', port: 0 }, (ev) => events.push(ev));
  await fe.listen();
  t.after(() => fe.close());
  const client = net.connect(fe.boundPort(), '127.0.0.1');
  setUp?.(client);
  t.after(() => client.destroy());
  await waitFor('the connection to open', () => events.some((e) => e.kind === 'open'), 5000);
  return { fe, events, client };
}

test('front end: client input is read only once every reason to pause reading was lifted', async (t) => {
  const { fe, events, client } = await frontEndWithClient(t);
  const data = (): string => events.flatMap((e) => (e.kind === 'data' ? [Buffer.from(e.bytes).toString()] : [])).join('');

  fe.pauseReading('vm');
  fe.pauseReading('compare');
  client.write('one');
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(data(), '', 'paused for two reasons: nothing read');
  fe.resumeReading('vm');
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(data(), '', "the VM runs again, but the compare's reason holds");
  fe.resumeReading('vm'); // lifting a reason twice changes nothing
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(data(), '');
  fe.resumeReading('compare');
  await waitFor('the input to be read once no reason is left', () => data() === 'one', 5000);
  // A new connection accepted while paused is not read either.
  fe.pauseReading('compare');
  const late = net.connect(fe.boundPort(), '127.0.0.1');
  t.after(() => late.destroy());
  await waitFor('the second connection to open', () => events.filter((e) => e.kind === 'open').length === 2, 5000);
  late.write('two');
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(data(), 'one');
  fe.resumeReading('compare');
  await waitFor('the second input', () => data() === 'onetwo', 5000);
});

test('front end: a client that sends and resets while it is not read: the guest gets its input, then EOF', async (t) => {
  const { fe, events, client } = await frontEndWithClient(t, (c) => c.on('error', () => undefined));
  const conn = events[0]!.conn;
  // A checkpoint (or a switchover) stops reading; the client sends a request and resets.
  fe.pauseReading('vm');
  client.write('SET k v\r\n');
  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual(events.map((e) => e.kind), ['open'], 'paused: nothing read yet');
  client.resetAndDestroy();
  await waitFor('the guest to be told the client is gone', () => events.some((e) => e.kind === 'close'), 5000);
  fe.resumeReading('vm');
  const shown = events.map((e) => (e.kind === 'data' ? `data ${e.conn} ${Buffer.from(e.bytes).toString()}` : `${e.kind} ${e.conn}`));
  // Read while flowing, the request reached the guest before the reset: so it must while paused.
  assert.deepEqual(shown, [`open ${conn}`, `data ${conn} SET k v\r\n`, `close ${conn}`]);
  assert.deepEqual(events.map((e) => e.seq), [1, 2, 3], 'numbered in that order');
});

test('front end: a client the front end resets for leaving its output unread: what it sent and was not taken in is dropped, the guest reads EOF', async (t) => {
  const { fe, events, client } = await frontEndWithClient(t, (c) => {
    c.on('error', () => undefined);
    c.pause(); // reads no output
  });
  const conn = events[0]!.conn;
  // Output the client does not read stops the front end reading it; then it sends a request.
  // (More than the kernel's buffers on loopback take, so that most of it stays in Node's.)
  const first = 16 * 1024 * 1024;
  fe.deliver({ kind: 'out', conn, offset: 0, bytes: new Uint8Array(first) });
  client.write('SET late v\r\n');
  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual(events.map((e) => e.kind), ['open'], 'held: the request is not read');
  // Past the unread bound the front end resets the client, as a kernel's abort: the request it
  // never took in is not the guest's.
  fe.deliver({ kind: 'out', conn, offset: first, bytes: new Uint8Array(limits.nicClientOutputUnsentBytesMax) });
  await waitFor('the guest to read EOF', () => events.some((e) => e.kind === 'close'), 10000);
  assert.equal(fe.openSockets(), 0, "the client's socket is gone (reset)");
  assert.deepEqual(events.map((e) => `${e.kind} ${e.conn}`), [`open ${conn}`, `close ${conn}`]);
});
