/**
 * The front end stops reading its clients for more than one reason at a time (a paused VM, the
 * COLO compare's bound on held output): lifting one reason must not lift the other. Real
 * client sockets on loopback.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { FrontEnd } from '../../src/net/frontend.js';
import type { NicInput } from '../../src/net/nic.js';
import { waitFor } from '../framework/harness.js';

test('front end: client input is read only once every reason to pause reading was lifted', async (t) => {
  const events: NicInput[] = [];
  const fe = new FrontEnd({ host: '127.0.0.1', port: 0 }, (ev) => events.push(ev));
  await fe.listen();
  t.after(() => fe.close());
  const client = net.connect(fe.boundPort(), '127.0.0.1');
  t.after(() => client.destroy());
  await waitFor('the connection to open', () => events.some((e) => e.kind === 'open'), 5000);
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
