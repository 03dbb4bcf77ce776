/**
 * Connections the guest closed (src/net/frontend.ts closeAfterGuest): their socket ends once the
 * client ends its side too, or after a bounded linger, and the front end's close resets them
 * all. A client that keeps its side open after the guest closed held the front end's close for
 * good: QMP quit answered but the VM lived on, and a migration failed at the switchover
 * ('the service address was not released'). Real processes and sockets.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { FrontEnd } from '../../src/net/frontend.js';
import type { NicInput } from '../../src/net/nic.js';
import { TestEnv, type VmProcess, freePort, guests, waitFor, withTimeout } from '../framework/harness.js';
import { RespClient } from '../framework/resp.js';
import { listeningFrontEnd } from '../framework/front-end.js';

/** A client that keeps its own side open after the server's FIN; what it received, whether it saw the FIN. */
interface HalfOpenClient {
  socket: net.Socket;
  received: () => string;
  ended: () => boolean;
  closed: () => boolean;
}

function connectHalfOpen(port: number): Promise<HalfOpenClient> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true });
    let received = '';
    let ended = false;
    let closed = false;
    socket.on('data', (d: Buffer) => (received += d.toString('latin1')));
    socket.on('end', () => (ended = true));
    socket.on('close', () => (closed = true));
    socket.on('error', () => undefined);
    socket.once('connect', () => resolve({ socket, received: () => received, ended: () => ended, closed: () => closed }));
    socket.once('error', reject);
  });
}

/** kv's QUIT: '+OK', then kv closes the connection; the client keeps its side open. */
async function quitAndLinger(port: number, env: TestEnv, then?: (s: net.Socket) => void): Promise<HalfOpenClient> {
  const c = await connectHalfOpen(port);
  env.onCleanup(() => {
    c.socket.destroy();
  });
  c.socket.write('QUIT\r\n');
  then?.(c.socket);
  await waitFor("kv's +OK and FIN after QUIT", () => c.received() === '+OK\r\n' && c.ended(), 10000);
  return c;
}

/** A kv source serving on a fresh port and a kv destination listening for its migration (64M each). */
async function kvSourceAndTarget(env: TestEnv): Promise<{ port: number; src: VmProcess; dst: VmProcess; migPort: number }> {
  const port = await freePort();
  const common = ['--net', `listen=127.0.0.1:${port}`, '--memory', '64M'];
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.kv, args: common }),
    env.startVm({ name: 'dst', guest: guests.kv, args: [...common, '--incoming', 'defer'] }),
  ]);
  await src.waitSerial('kv ready');
  return { port, src, dst, migPort: await dst.listenIncoming() };
}

test('a client the guest closed that keeps its side open holds up neither a migration nor quit; its input after the close is read and dropped', async (t) => {
  const env = new TestEnv(t);
  const { port, src, dst, migPort } = await kvSourceAndTarget(env);

  await quitAndLinger(port, env);
  // Another sends far more than the input window (and the kernel's buffers) after its QUIT:
  // the front end must read it all (to notice the client's end), and hand none of it on.
  const upload = Buffer.alloc(32 * 1024 * 1024, 0x61);
  let uploaded = false;
  await quitAndLinger(port, env, (s) => s.write(upload, () => (uploaded = true)));
  await waitFor('the front end to take all 32 MiB a client sent after the guest closed its connection', () => uploaded, 20000);

  const other = await RespClient.connect(port);
  env.onCleanup(() => other.close());
  assert.equal(await other.command(['SET', 'k', 'v']), 'OK');

  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  await src.waitMigrationStatus('completed', 20000);
  await dst.waitMigrationStatus('completed', 10000);

  const reader = await RespClient.whenServing(port, 'the target on the service address');
  env.onCleanup(() => reader.close());
  assert.equal(await reader.command(['GET', 'k']), 'v');
  await quitAndLinger(port, env);
  await withTimeout(dst.qmp.execute('quit'), 5000, 'the reply to quit');
  assert.equal(await dst.waitExit(5000), 0);
  await withTimeout(src.qmp.execute('quit'), 5000, 'the reply to quit on the source');
  await src.waitExit(5000);
  assert.deepEqual(src.errorLines(), []);
  assert.deepEqual(dst.errorLines(), []);
});

test('front end: the socket of a connection the guest closed ends with the client, or after the linger; close() resets the rest', async (t) => {
  const { fe, events, clients, opens } = await listeningFrontEnd(t, 16, 300);
  const port = fe.boundPort();
  const dataOf = (conn: number): string => events.flatMap((e) => (e.kind === 'data' && e.conn === conn ? [Buffer.from(e.bytes).toString()] : [])).join('');

  // The guest replies and closes; the client keeps its side open and sends more.
  const a = await connectHalfOpen(port);
  clients.push(a.socket);
  await waitFor('the open event', () => opens().length === 1, 5000);
  const connA = opens()[0]!;
  a.socket.write('before');
  await waitFor('the input before the close', () => dataOf(connA) === 'before', 5000);
  fe.deliver({ kind: 'out', conn: connA, offset: 0, bytes: Buffer.from('bye') });
  fe.deliver({ kind: 'close', conn: connA, offset: 3 });
  await waitFor("the guest's last output and FIN at the client", () => a.received() === 'bye' && a.ended(), 5000);
  a.socket.write('after');
  // Past the linger the socket is gone, though the client never ended its side.
  await waitFor('the lingering socket to be destroyed', () => fe.openSockets() === 0, 5000);
  assert.equal(dataOf(connA), 'before', 'input after the guest closed is dropped');
  assert.equal(events.filter((e) => e.conn === connA && e.kind === 'data').length, 1);

  // A client that ends its side after the guest closed: the socket goes at once.
  const fe2 = new FrontEnd({ host: '127.0.0.1', port: 0 }, (ev) => events.push(ev), { seq: 1000, conn: 1000 }, 16, 60000);
  await fe2.listen();
  t.after(() => fe2.close());
  const b = await connectHalfOpen(fe2.boundPort());
  clients.push(b.socket);
  await waitFor('the open event on the second front end', () => opens().length === 2, 5000);
  fe2.deliver({ kind: 'close', conn: opens()[1]!, offset: 0 });
  await waitFor('the FIN at the client', b.ended, 5000);
  b.socket.end();
  await waitFor("the socket to be closed on the client's end", () => fe2.openSockets() === 0, 5000);

  // One that does not: close() resets it instead of waiting for the linger.
  const c = await connectHalfOpen(fe2.boundPort());
  clients.push(c.socket);
  await waitFor('the third open event', () => opens().length === 3, 5000);
  fe2.deliver({ kind: 'close', conn: opens()[2]!, offset: 0 });
  await waitFor('the FIN at the third client', c.ended, 5000);
  assert.equal(fe2.openSockets(), 1);
  await withTimeout(fe2.close(), 5000, "the front end's close with a lingering socket");
  assert.equal(fe2.openSockets(), 0);
});

test('front end: close at a switchover frees the address at once, and the last output of a connection the guest closed still reaches its slow client', async (t) => {
  const events: NicInput[] = [];
  const fe = new FrontEnd({ host: '127.0.0.1', port: 0 }, (ev) => events.push(ev), { seq: 0, conn: 0 }, 16, 20000);
  await fe.listen();
  t.after(() => fe.close());
  const port = fe.boundPort();
  const slow = net.connect({ port, host: '127.0.0.1' });
  slow.on('error', () => undefined);
  slow.pause(); // reads nothing until the front end is closed
  const live = net.connect({ port, host: '127.0.0.1' });
  live.on('error', () => undefined);
  let liveClosed = false;
  live.on('close', () => (liveClosed = true));
  t.after(() => {
    slow.destroy();
    live.destroy();
  });
  await waitFor('two open events', () => events.filter((e) => e.kind === 'open').length === 2, 5000);
  const [connSlow] = events.filter((e) => e.kind === 'open').map((e) => e.conn);
  // More than the kernel's buffers hold: part of it stays in Node's, as after a large reply.
  const reply = Buffer.alloc(32 * 1024 * 1024);
  for (let i = 0; i < reply.length; i += 4096) reply.writeUInt32BE(i, i);
  fe.deliver({ kind: 'out', conn: connSlow!, offset: 0, bytes: reply });
  fe.deliver({ kind: 'close', conn: connSlow!, offset: reply.length });
  await withTimeout(fe.close({ drainClosed: true }), 5000, "the front end's close");
  // The address is free for the next owner (a takeover, the migration's destination).
  const next = net.createServer();
  await new Promise<void>((resolve, reject) => {
    next.once('error', reject);
    next.listen({ host: '127.0.0.1', port, exclusive: true }, resolve);
  });
  await new Promise<void>((resolve) => next.close(() => resolve()));
  await waitFor('the live connection to be reset', () => liveClosed, 5000);
  // The slow client now reads: the whole reply, then the FIN.
  const got: Buffer[] = [];
  let ended = false;
  slow.on('data', (d: Buffer) => got.push(d));
  slow.on('end', () => (ended = true));
  slow.resume();
  await waitFor("the slow client's whole reply and FIN", () => ended, 20000);
  assert.ok(Buffer.concat(got).equals(reply), `the reply arrived whole (${Buffer.concat(got).length} of ${reply.length} bytes)`);
});

/**
 * A front end with one client that reads nothing, whose connection the guest closed after
 * 32 MiB of output: most of it waits in the front end's socket.
 */
async function closedOwingOutput(t: { after(fn: () => unknown): void }): Promise<{ fe: FrontEnd; slow: net.Socket; closed: () => boolean }> {
  const events: NicInput[] = [];
  const fe = new FrontEnd({ host: '127.0.0.1', port: 0 }, (ev) => events.push(ev), { seq: 0, conn: 0 }, 16, 20000);
  await fe.listen();
  t.after(() => fe.close());
  const slow = net.connect({ port: fe.boundPort(), host: '127.0.0.1' });
  slow.on('error', () => undefined);
  slow.pause();
  let closed = false;
  slow.on('close', () => (closed = true));
  t.after(() => slow.destroy());
  await waitFor('the open event', () => events.some((e) => e.kind === 'open'), 5000);
  const conn = events.find((e) => e.kind === 'open')!.conn;
  fe.deliver({ kind: 'out', conn, offset: 0, bytes: Buffer.alloc(32 * 1024 * 1024, 1) });
  fe.deliver({ kind: 'close', conn, offset: 32 * 1024 * 1024 });
  return { fe, slow, closed: () => closed };
}

test('front end: close at process exit resets a closed connection that still owes output: nothing lingers to keep the process alive', async (t) => {
  const { fe, slow, closed } = await closedOwingOutput(t);
  await withTimeout(fe.close(), 5000, "the front end's close");
  assert.equal(fe.openSockets(), 0);
  slow.resume();
  await waitFor('the slow client to see its connection end', closed, 10000);
});

test('a migration source whose switchover left a slow client draining its last reply quits at once: the draining socket is reset, not waited for', async (t) => {
  const env = new TestEnv(t);
  const { port, src, dst, migPort } = await kvSourceAndTarget(env);
  const other = await RespClient.connect(port);
  env.onCleanup(() => other.close());
  assert.equal(await other.command(['SET', 'v', 'v'.repeat(512 * 1024)]), 'OK');
  // 16 MiB of replies, then kv closes the connection: more than the kernel's buffers take, so
  // the rest waits in the source's front end for a client that reads nothing.
  const slow = await connectHalfOpen(port);
  env.onCleanup(() => {
    slow.socket.destroy();
  });
  slow.socket.pause();
  slow.socket.write('GET v\r\n'.repeat(32) + 'QUIT\r\n');
  // kv takes input in arrival order: its answer to this comes after it closed the slow one.
  assert.equal(await other.command(['PING']), 'PONG');
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  await src.waitMigrationStatus('completed', 20000);
  assert.equal(slow.closed(), false, 'the slow client is still being sent its last reply after the switchover');
  // QEMU's quit does not wait for clients: it used to wait here for the linger (10 s).
  const quitAt = performance.now();
  await withTimeout(src.qmp.execute('quit'), 5000, 'the reply to quit on the source');
  await src.waitExit(3000);
  const ms = performance.now() - quitAt;
  assert.ok(ms < 3000, `the source exited ${ms.toFixed(0)} ms after quit`);
  slow.socket.resume();
  // The source's kernel sends what it holds, then its FIN (the client keeps its side open).
  await waitFor("the slow client's connection to end with the source", () => slow.ended() || slow.closed(), 5000);
  assert.deepEqual(src.errorLines(), []);
  assert.deepEqual(dst.errorLines(), []);
});

test('front end: after a close at a switchover, a close at exit resets the sockets still draining', async (t) => {
  const { fe, slow, closed } = await closedOwingOutput(t);
  await withTimeout(fe.close({ drainClosed: true }), 5000, "the front end's close at the switchover");
  assert.equal(fe.openSockets(), 1, 'the closed connection drains on');
  await withTimeout(fe.close(), 5000, "the front end's close at exit");
  assert.equal(fe.openSockets(), 0);
  slow.resume();
  await waitFor('the slow client to see its connection end', closed, 5000);
});
