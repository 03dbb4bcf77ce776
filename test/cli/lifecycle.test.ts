/** `colo run`'s process lifecycle: quit and signals end the process promptly and cleanly. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { spawn } from 'node:child_process';
import { QmpClient } from '../../src/control/qmp-client.js';
import { TestEnv, freePort, guests, runProgram, sleep, waitFor, withTimeout } from '../framework/harness.js';
import { assertNoErrors, statuses } from '../migration/helpers.js';
import { exitOnConnectGuest } from '../framework/machine.js';
import { lockDirOf } from '../../src/block/image-lock.js';

/**
 * A TCP port on loopback whose connects stay pending: a listener in a stopped process
 * (SIGSTOP, it never accepts) with a backlog of 1 and its accept queue filled. Linux drops
 * the SYNs of further connects, which retry for minutes. Checked: a probe does not connect.
 */
async function portThatNeverConnects(env: TestEnv): Promise<number> {
  const child = spawn(
    process.execPath,
    ['-e', `const s = require('net').createServer(); s.listen({ port: 0, host: '127.0.0.1', backlog: 1 }, () => console.log(s.address().port));`],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const sockets: net.Socket[] = [];
  env.onCleanup(() => {
    for (const s of sockets) s.destroy();
    child.kill('SIGKILL');
  });
  const port = await withTimeout(
    new Promise<number>((resolve) => child.stdout!.once('data', (d: Buffer) => resolve(Number(String(d).trim())))),
    10000,
    'the never-accepting listener to print its port',
  );
  child.kill('SIGSTOP');
  const connect = (): { socket: net.Socket; connected: Promise<boolean> } => {
    const socket = net.connect(port, '127.0.0.1');
    sockets.push(socket);
    socket.on('error', () => undefined);
    return { socket, connected: new Promise((resolve) => socket.once('connect', () => resolve(true))) };
  };
  // A backlog of 1 takes two connections (Linux: full when more than the backlog wait).
  for (let i = 0; i < 2; i++) await withTimeout(connect().connected, 5000, `filler connection ${i + 1} to the stopped listener`);
  const probe = connect();
  const r = await Promise.race([probe.connected, sleep(300).then(() => false)]);
  probe.socket.destroy();
  assert.equal(r, false, 'a connect to the full listener stays pending (the test needs that)');
  return port;
}

const endings = [
  { how: 'quit', cancelFirst: false },
  { how: 'quit', cancelFirst: true },
  { how: 'SIGTERM', cancelFirst: false },
] as const;

for (const { how, cancelFirst } of endings) {
  test(`regression: ${how} while an outgoing migration's connect is still pending${cancelFirst ? ' (after migrate_cancel)' : ''}: the process exits at once`, async (t) => {
    const env = new TestEnv(t);
    const port = await portThatNeverConnects(env);
    const src = await env.startVm({ name: 'src', guest: guests.spin });
    const mark = src.qmp.eventCount;
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    await sleep(200);
    assert.equal(await src.migrationStatus(), 'setup', 'the migration waits for its connect');
    if (cancelFirst) {
      await src.qmp.execute('migrate_cancel');
      await src.waitMigrationStatus('cancelled', 5000);
      assert.deepEqual(statuses(src, mark), ['setup', 'cancelling', 'cancelled']);
    }
    const quitAt = Date.now();
    if (how === 'quit') await src.qmp.execute('quit');
    else src.kill('SIGTERM');
    // Before the fix the pending connect (its socket and its timer) held the process until
    // its timeout, limits.migrationConnectTimeoutMs (10 s).
    assert.equal(await src.waitExit(15000), 0, 'the source exits with status 0');
    const ms = Date.now() - quitAt;
    t.diagnostic(`exited ${ms} ms after ${how}`);
    assert.ok(ms < 2000, `the source exits promptly after ${how} (took ${ms} ms)`);
    assertNoErrors(src);
  });
}

test("regression: --qmp tcp:HOST:PORT,server,nowait (QEMU's chardev suffixes) is accepted, as for unix:PATH", async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const vm = await env.startVm({ name: 'vm', guest: guests.spin, noQmp: true, args: ['--qmp', `tcp:127.0.0.1:${port},server,nowait`] });
  // Before, options.ts refused it ("--qmp: expected unix:PATH or tcp:HOST:PORT") though the
  // monitor's own address parser takes it.
  const qmp = await waitFor(
    'the QMP monitor on the tcp port',
    async () => {
      if (!vm.alive) throw new Error(`vm exited with code ${vm.exitCode}: ${vm.stderr.trim()}`);
      return QmpClient.connect(`tcp:127.0.0.1:${port}`, { timeoutMs: 2000 }).catch(() => undefined);
    },
    15000,
    50,
  );
  env.onCleanup(() => qmp.close());
  const status = await qmp.execute<{ status: string }>('query-status');
  assert.equal(status.status, 'running');
  await qmp.execute('quit');
  assert.equal(await vm.waitExit(10000), 0);
});

test('regression: SIGTERM while colo run loads its --incoming file: the load ends, then the process quits cleanly (status 0, QMP socket removed)', async (t) => {
  const env = new TestEnv(t);
  // A saved state, fed through a FIFO: the load (synchronous reads, as a large file's that
  // takes seconds) waits for the writer, so the signal comes in the middle of the boot.
  const src = await env.startVm({ name: 'src', guest: guests.spin, args: ['--memory', '4M'] });
  const state = env.file('spin.state');
  await src.qmp.execute('migrate', { uri: `file:${state}` });
  await src.waitMigrationStatus('completed', 15000);
  await src.stop();
  const fifo = env.file('state.fifo');
  const mk = await runProgram('mkfifo', [fifo], { timeoutMs: 5000 });
  assert.equal(mk.code, 0, mk.stderr);
  const qmpPath = env.file('dst.qmp');
  const vm = await env.startVm({ name: 'dst', guest: guests.spin, noQmp: true, args: ['--memory', '4M', '--qmp', `unix:${qmpPath}`, '--incoming', `file:${fifo}`] });
  await waitFor('the QMP socket of dst (then it opens the FIFO and waits)', () => {
    if (!vm.alive) throw new Error(`dst exited with code ${vm.exitCode}: ${vm.stderr}`);
    return fs.existsSync(qmpPath);
  }, 15000);
  await sleep(200);
  vm.kill('SIGTERM');
  await sleep(300);
  // Before the fix the signal came before colo run handled signals: the process died at
  // once (status 143), its QMP socket file left behind.
  assert.ok(vm.alive, `the process goes on with its load: exited with code ${vm.exitCode}, signal ${vm.exitSignal}`);
  const writer = spawn('sh', ['-c', 'cat "$1" > "$2"', 'sh', state, fifo], { stdio: 'ignore' });
  env.onCleanup(() => {
    writer.kill('SIGKILL');
  });
  assert.equal(await vm.waitExit(15000), 0, `exits with status 0: ${vm.stderr}`);
  assert.match(vm.stderr, /SIGTERM received, quitting/);
  assert.equal(fs.existsSync(qmpPath), false, 'the QMP socket file is removed');
  assertNoErrors(vm);
});

test('regression: quit while migrate-incoming starts its multifd receiver threads: the process exits', async (t) => {
  const env = new TestEnv(t);
  const vm = await env.startVm({ name: 'dst', guest: guests.spin, args: ['--incoming', 'defer'] });
  await vm.setMigration({ multifd: true }, { 'multifd-channels': 4 });
  // A second client: QMP runs one client's commands one at a time.
  const other = await QmpClient.connect(`unix:${vm.qmpPath}`, { timeoutMs: 5000 });
  env.onCleanup(() => other.close());
  const incoming = vm.qmp.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' }).then(
    () => 'started',
    (err: unknown) => `failed: ${String(err)}`,
  );
  await sleep(10);
  await other.execute('quit');
  // Before the fix the migration, listening once its threads were up, came after the quit's
  // close() and kept the process alive for good.
  assert.equal(await vm.waitExit(8000), 0, `exits with status 0: ${vm.stderr}`);
  t.diagnostic(`migrate-incoming: ${await incoming}`);
  assertNoErrors(vm);
});

for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  test(`${sig} ends colo run as QEMU's does: SHUTDOWN event, status 0, its QMP socket file removed`, async (t) => {
    const env = new TestEnv(t);
    const vm = await env.startVm({ name: 'vm', guest: guests.spin });
    assert.equal(await vm.status(), 'running');
    const mark = vm.qmp.eventCount;
    vm.kill(sig);
    // Before, SIGHUP (the terminal closing) killed the process: status null, the socket file left.
    assert.equal(await vm.waitExit(8000), 0, `exits with status 0 (signal ${vm.exitSignal}): ${vm.stderr}`);
    assert.match(vm.stderr, new RegExp(`${sig} received, quitting`));
    assert.equal(fs.existsSync(vm.qmpPath), false, 'the QMP socket file is removed');
    // Before, no SHUTDOWN event came (QEMU's is {guest: false, reason: host-signal}).
    assert.deepEqual(vm.eventsOf('SHUTDOWN', mark).map((e) => e.data), [{ guest: false, reason: 'host-signal' }]);
    assertNoErrors(vm);
  });
}

test("a guest's own exit: SHUTDOWN {guest: true, reason: guest-shutdown} with its exit-code, then the process exits with that status", async (t) => {
  const env = new TestEnv(t);
  // Accepts one client, then exits with status 5.
  const guest = exitOnConnectGuest(t, 5);
  const port = await freePort();
  const vm = await env.startVm({ name: 'vm', guest, args: ['--net', `listen=127.0.0.1:${port}`, '--memory', '16M'] });
  const mark = vm.qmp.eventCount;
  const client = net.connect(port, '127.0.0.1');
  client.on('error', () => undefined);
  env.onCleanup(() => {
    client.destroy();
  });
  assert.equal(await vm.waitExit(8000), 5, `exits with the guest's status: ${vm.stderr}`);
  // colo up stops a pair with it even if it has to kill a primary that does not end in time.
  assert.deepEqual(vm.eventsOf('SHUTDOWN', mark).map((e) => e.data), [{ guest: true, reason: 'guest-shutdown', 'exit-code': 5 }]);
});

test('regression: SIGINT while colo run instruments a guest not in the cache: one info line, then a clean quit (status 0) with no lock entry and no QMP socket left', async (t) => {
  const env = new TestEnv(t);
  // A cold cache: the guest's own .colo-cache is in the fresh test folder, and so is the
  // fallback (os.tmpdir(), from TMPDIR).
  const guest = env.file('spin.wasm');
  fs.copyFileSync(guests.spin, guest);
  fs.mkdirSync(env.file('tmp'));
  const image = env.file('early.img');
  fs.writeFileSync(image, Buffer.alloc(64 * 1024));
  const lockDir = lockDirOf(image);
  const qmpPath = env.file('early.qmp');
  const vm = await env.startVm({
    name: 'early',
    guest,
    noQmp: true,
    env: { TMPDIR: env.file('tmp'), COLO_LOG: 'debug' },
    args: ['--memory', '16M', '--qmp', `unix:${qmpPath}`, '--drive', `file=${image}`],
  });
  await waitFor('colo run to start instrumenting the guest', () => {
    if (!vm.alive) throw new Error(`exited with code ${vm.exitCode} before instrumenting: ${vm.stderr}`);
    return /instrumenting .*spin\.wasm \(not in the cache/.test(vm.stderr);
  }, 15000);
  vm.kill('SIGINT');
  // Before the fix no handler was set yet: the process died of the signal (status null), no line.
  assert.equal(await vm.waitExit(120000), 0, `exits with status 0 (signal ${vm.exitSignal}): ${vm.stderr}`);
  assert.equal(vm.stderr.match(/SIGINT received, quitting/g)?.length, 1, `one line says why: ${vm.stderr}`);
  assert.equal(fs.existsSync(qmpPath), false, 'no QMP socket file is left');
  assert.equal(fs.existsSync(lockDir), false, `no lock entry of the image is left in ${lockDir}`);
  assert.ok(!/kv ready|machine started/.test(vm.stderr), 'the guest never ran');
  assertNoErrors(vm);
});
