import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { FrontEnd } from '../../src/net/frontend.js';
import { Nic, type NicInput } from '../../src/net/nic.js';
import { waitFor } from '../framework/harness.js';
import { listeningFrontEnd } from '../framework/front-end.js';

/** A client connection, and whether it has ended (closed or reset by the front end). */
function connect(port: number): Promise<{ socket: net.Socket; closed: () => boolean }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ port, host: '127.0.0.1' });
    let closed = false;
    socket.once('close', () => (closed = true));
    socket.on('error', () => undefined);
    socket.once('connect', () => resolve({ socket, closed: () => closed }));
    socket.once('error', reject);
  });
}

test('front end: at most connectionsMax guest connections; a client gone is counted until the guest closes it', async (t) => {
  const { fe, events, clients, opens } = await listeningFrontEnd(t, 3);
  const port = fe.boundPort();

  for (let i = 0; i < 3; i++) clients.push((await connect(port)).socket);
  await waitFor('three open events', () => opens().length === 3, 5000);
  const [first, second] = opens();

  // A fourth client is reset; the guest never hears of it.
  const fourth = await connect(port);
  clients.push(fourth.socket);
  await waitFor('the fourth client to be closed by the front end', fourth.closed, 5000);
  assert.equal(opens().length, 3);

  // The first client goes away; the guest has not closed its connection: still no room.
  clients[0]!.end();
  await waitFor('the guest to be told client 1 closed', () => events.some((e) => e.kind === 'close' && e.conn === first), 5000);
  const fifth = await connect(port);
  clients.push(fifth.socket);
  await waitFor('the fifth client to be closed by the front end', fifth.closed, 5000);
  assert.equal(opens().length, 3);

  // The guest closes connections 1 and 2: two new clients are taken.
  fe.deliver({ kind: 'close', conn: first!, offset: 0 });
  fe.deliver({ kind: 'close', conn: second!, offset: 0 });
  clients.push((await connect(port)).socket, (await connect(port)).socket);
  await waitFor('two more open events', () => opens().length === 5, 5000);
});

test('front end: a closed front end numbers no more input; the one started after it (a failed switchover resumed) has every event taken', async (t) => {
  // The guest's NIC, fed by both front ends in turn as the machine is: input that comes while
  // the vCPU saves its state waits and goes in after the save (Machine.flushInput).
  const nic = new Nic();
  const stale: NicInput[] = [];
  let saving: NicInput[] | null = null;
  const feed = (ev: NicInput): void => {
    if (saving !== null) {
      saving.push(ev);
      return;
    }
    if (!nic.enqueue(ev)) stale.push(ev);
    while (nic.admitOne());
  };
  const old = new FrontEnd({ host: '127.0.0.1', port: 0 }, feed);
  await old.listen();
  const clients: net.Socket[] = [];
  let next: FrontEnd | null = null;
  t.after(async () => {
    for (const s of clients) s.destroy();
    await old.close();
    await next?.close();
  });
  for (let i = 0; i < 2; i++) {
    const c = await connect(old.boundPort());
    clients.push(c.socket);
  }
  await waitFor('two connections the guest knows', () => nic.connectionIds().length === 2, 5000);
  // The switchover pauses reading; a client's request waits in its socket.
  old.pauseReading('vm');
  clients[0]!.write('SET k v\r\n');
  await new Promise((r) => setTimeout(r, 100));
  await old.close();
  // The resume after the failed switchover (Vm.startFrontEnd): the guest's state is saved, and
  // the new front end numbers from it and resets the connections the guest knows.
  saving = [];
  const fromSeq = nic.lastSeq;
  await new Promise((r) => setTimeout(r, 100));
  const during = saving;
  saving = null;
  for (const ev of during) feed(ev);
  next = new FrontEnd({ host: '127.0.0.1', port: 0 }, feed, { seq: fromSeq, conn: nic.maxConnId() });
  for (const conn of nic.connectionIds()) next.resetGuestConnection(conn);
  await next.listen();
  const late = await connect(next.boundPort());
  clients.push(late.socket);
  await waitFor('the new client to be opened by the new front end', () => next!.connectionIds().length === 1, 5000);
  assert.deepEqual(stale, [], 'no event was dropped as stale');
  assert.ok(nic.isKnown(next.connectionIds()[0]!), "the guest knows the new client's connection");
  assert.equal(nic.lastSeq, fromSeq + 3, 'two resets and one open were numbered after the state');
});

test('front end: a failed accept (the listening server reports an error) does not end the process; the next client is served', async (t) => {
  const { fe, events, clients } = await listeningFrontEnd(t);
  // What libuv hands Node's server for an accept that failed with other than EAGAIN or
  // ECONNABORTED (Linux reports a pending connection's network error there, e.g. EPROTO).
  const server = (fe as unknown as { server: net.Server }).server;
  const err = Object.assign(new Error('accept EPROTO'), { code: 'EPROTO', syscall: 'accept' });
  let thrown: unknown = null;
  try {
    server.emit('error', err);
  } catch (e) {
    thrown = e;
  }
  assert.equal(thrown, null, `the error escaped the front end (an uncaught exception ends the VM): ${String(thrown)}`);
  clients.push((await connect(fe.boundPort())).socket);
  await waitFor('the next client to be opened', () => events.some((e) => e.kind === 'open'), 5000);
  assert.equal(server.listening, true);
});
