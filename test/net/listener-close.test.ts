/**
 * A guest that closes its listening socket (fd 3, the `--net listen` preopen). WASI preview1
 * cannot open it again: the VM accepts nothing any more. A real server's clients are then
 * refused (ECONNREFUSED), and those the kernel had queued for accept are reset; the front end
 * kept listening instead, and each new client hung (up to limits.nicConnectionsMax of them).
 * The fact travels in the NIC state: a migrated VM, or a COLO secondary that takes over, does
 * not listen either. Connections the guest accepted go on. Real processes and sockets.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { TestEnv, type VmProcess, freePort, waitFor } from '../framework/harness.js';
import { watGuest } from '../framework/machine.js';

/**
 * Accepts one connection and echoes it; a request starting with 'X' first closes fd 3
 * (fd_close's errno at address 8). At EOF it idles in poll_oneoff (a clock) for good.
 */
function listenCloseGuest(t: TestContext): string {
  return watGuest(t, 'listen-close', `(module
    (import "wasi_snapshot_preview1" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "sock_recv" (func $recv (param i32 i32 i32 i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "sock_send" (func $send (param i32 i32 i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "fd_close" (func $close (param i32) (result i32)))
    (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 1)
    (func (export "_start") (local $fd i32) (local $n i32)
      (i32.store (i32.const 8) (i32.const -1))
      (if (call $accept (i32.const 3) (i32.const 0) (i32.const 0)) (then (unreachable)))
      (local.set $fd (i32.load (i32.const 0)))
      (i32.store (i32.const 16) (i32.const 256))
      (i32.store (i32.const 20) (i32.const 256))
      (block $eof
        (loop $serve
          (br_if $eof (call $recv (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 0) (i32.const 32) (i32.const 36)))
          (local.set $n (i32.load (i32.const 32)))
          (br_if $eof (i32.eqz (local.get $n)))
          (if (i32.eq (i32.load8_u (i32.const 256)) (i32.const 88))
            (then (i32.store (i32.const 8) (call $close (i32.const 3)))))
          (i32.store (i32.const 48) (i32.const 256))
          (i32.store (i32.const 52) (local.get $n))
          (drop (call $send (local.get $fd) (i32.const 48) (i32.const 1) (i32.const 0) (i32.const 40)))
          (br $serve)))
      ;; a clock subscription of 1 s at 512, its event at 600, the count at 700
      (i64.store (i32.const 512) (i64.const 1))
      (i32.store8 (i32.const 520) (i32.const 0))
      (i32.store (i32.const 528) (i32.const 1))
      (i64.store (i32.const 536) (i64.const 1000000000))
      (i64.store (i32.const 544) (i64.const 0))
      (i32.store16 (i32.const 552) (i32.const 0))
      (loop $idle
        (drop (call $poll (i32.const 512) (i32.const 600) (i32.const 1) (i32.const 700)))
        (br $idle))))`);
}

interface Client {
  socket: net.Socket;
  received: () => string;
  ended: () => boolean;
}

function connect(port: number): Promise<Client> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true });
    let received = '';
    let ended = false;
    socket.on('data', (d: Buffer) => (received += d.toString('latin1')));
    socket.on('end', () => (ended = true));
    socket.on('close', () => (ended = true));
    socket.on('error', () => undefined);
    socket.once('connect', () => resolve({ socket, received: () => received, ended: () => ended }));
    socket.once('error', reject);
  });
}

/**
 * What a new client meets within `ms`: 'refused' (ECONNREFUSED), 'closed' (accepted, then
 * ended or reset without a byte), 'hung' (connected, nothing happened).
 */
function probe(port: number, ms = 3000): Promise<'refused' | 'closed' | 'hung'> {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host: '127.0.0.1' });
    const done = (r: 'refused' | 'closed' | 'hung'): void => {
      clearTimeout(timer);
      socket.destroy();
      resolve(r);
    };
    const timer = setTimeout(() => done('hung'), ms);
    socket.on('error', (err: NodeJS.ErrnoException) => done(err.code === 'ECONNREFUSED' ? 'refused' : 'closed'));
    socket.on('end', () => done('closed'));
    socket.on('close', () => done('closed'));
  });
}

/** The VM's front end came up after a switchover or takeover: it listens, or says why not. */
async function frontEndUp(vm: VmProcess): Promise<void> {
  await waitFor(`${vm.spec.name}'s front end to come up`, () => /serving guest NIC on|not listening on/.test(vm.stderr), 10000);
}

async function echo(c: Client, text: string): Promise<void> {
  const before = c.received().length;
  c.socket.write(text);
  await waitFor(`the echo of '${text}'`, () => c.received().length >= before + text.length, 10000);
  assert.equal(c.received().slice(before), text);
}

/** The listen-close guest on a source and an `--incoming defer` destination, both on one `--net` address. */
async function sourceAndDestination(t: TestContext): Promise<{ env: TestEnv; port: number; src: VmProcess; dst: VmProcess }> {
  const env = new TestEnv(t);
  const port = await freePort();
  const guest = listenCloseGuest(t);
  const common = ['--net', `listen=127.0.0.1:${port}`];
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest, args: common }),
    env.startVm({ name: 'dst', guest, args: [...common, '--incoming', 'defer'] }),
  ]);
  return { env, port, src, dst };
}

/** The guest closes fd 3 through client `a` (which it accepted); `queued` connected before and was never accepted. */
async function closeListener(vm: VmProcess, port: number, env: TestEnv): Promise<{ a: Client; queued: Client }> {
  const a = await connect(port);
  env.onCleanup(() => void a.socket.destroy());
  await echo(a, 'hello');
  const queued = await connect(port);
  env.onCleanup(() => void queued.socket.destroy());
  await echo(a, 'X');
  assert.equal((await vm.pmem(8, 4)).readInt32LE(0), 0, "the guest's fd_close(3) succeeded");
  return { a, queued };
}

test('a guest that closes its listening socket: new clients are refused, the queued one is closed, the accepted one is served on', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const vm = await env.startVm({ name: 'vm', guest: listenCloseGuest(t), args: ['--net', `listen=127.0.0.1:${port}`] });
  const { a, queued } = await closeListener(vm, port, env);
  await waitFor('the client queued for accept to be closed', () => queued.ended(), 10000);
  assert.equal(queued.received(), '', 'the queued client got nothing');
  assert.equal(await probe(port), 'refused', 'a new client is refused');
  await echo(a, 'still served');
  assert.equal(await vm.status(), 'running');
});

test('a guest that closed its listening socket does not listen after a migration', async (t) => {
  const { env, port, src, dst } = await sourceAndDestination(t);
  await closeListener(src, port, env);
  const migPort = await dst.listenIncoming();
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  await src.waitMigrationStatus('completed', 20000);
  await waitFor('the destination to run', async () => (await dst.status()) === 'running', 10000);
  await frontEndUp(dst);
  assert.equal(await probe(port), 'refused', 'a new client of the destination is refused');
  assert.equal((await dst.pmem(8, 4)).readInt32LE(0), 0, 'the destination has the guest that closed fd 3');
});

test('a guest that closed its listening socket under COLO: the primary refuses clients, and so does the secondary after a takeover', async (t) => {
  const { env, port, src, dst } = await sourceAndDestination(t);
  await Promise.all([src.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': 300 }), dst.setMigration({ 'x-colo': true })]);
  const migPort = await dst.listenIncoming();
  await src.migrateIntoColo(dst, migPort);
  const { a, queued } = await closeListener(src, port, env);
  await waitFor('the client queued for accept to be closed', () => queued.ended(), 10000);
  assert.equal(await probe(port), 'refused', "a new client of the COLO primary is refused");
  await echo(a, 'still served');
  // A checkpoint after the close, then the primary is lost.
  await dst.waitEvent('RESUME', { after: dst.qmp.eventCount, timeoutMs: 15000 });
  src.kill();
  await src.waitExit();
  await dst.yankMigration();
  const mark = dst.qmp.eventCount;
  await dst.qmp.execute('x-colo-lost-heartbeat');
  await dst.waitEvent('COLO_EXIT', { after: mark, timeoutMs: 10000 });
  await waitFor('the secondary to run', async () => (await dst.status()) === 'running', 10000);
  await frontEndUp(dst);
  assert.equal((await dst.pmem(8, 4)).readInt32LE(0), 0, 'the secondary has the guest that closed fd 3');
  assert.equal(await probe(port), 'refused', 'a new client of the secondary that took over is refused');
});
