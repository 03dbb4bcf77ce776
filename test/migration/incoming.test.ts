/**
 * migrate-incoming on a `--incoming defer` destination: one incoming migration at a time,
 * and a start that fails changes nothing, so it can be tried again.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { QmpClient } from '../../src/control/qmp-client.js';
import { TestEnv, freePort, guests, memwalkRegion, waitFor, withTimeout, type VmProcess } from '../framework/harness.js';
import { AckedWriter, RespClient, countMissing } from '../framework/resp.js';
import { FrameDecoder, FrameType } from '../../src/migration/stream.js';
import { limits } from '../../src/core/limits.js';
import { assertAdvancing, assertNoErrors, assertStill, statuses } from './helpers.js';

/** A running memwalk source and a --incoming defer destination, both with multifd on (its receivers take a while to start). */
async function pair(env: TestEnv): Promise<{ src: VmProcess; dst: VmProcess }> {
  const common = ['--memory', '32M'];
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.memwalk, args: common, guestArgs: ['8M'] }),
    env.startVm({ name: 'dst', guest: guests.memwalk, args: [...common, '--incoming', 'defer'], guestArgs: ['8M'] }),
  ]);
  await Promise.all([src.setMigration({ multifd: true }, { 'multifd-channels': 4 }), dst.setMigration({ multifd: true }, { 'multifd-channels': 4 })]);
  await src.waitSerial('B', { count: 2 });
  return { src, dst };
}

/** Migrate src into dst's listening port; both complete and the guest runs on at dst with its memory whole. */
async function migrateInto(src: VmProcess, dst: VmProcess, port: number): Promise<void> {
  const region = memwalkRegion(src.serial());
  assert.ok(region);
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  await src.waitMigrationStatus('completed');
  await dst.waitMigrationStatus('completed');
  await assertAdvancing(dst);
  assert.equal(await dst.memwalkCheck(region), null, 'the migrated memory passes the memwalk check');
}

async function listeningPort(vm: VmProcess): Promise<number> {
  const r = await vm.qmp.execute<{ status?: string; 'socket-address'?: { port: string }[] }>('query-migrate');
  assert.equal(r.status, 'setup', `query-migrate: ${JSON.stringify(r)}`);
  assert.equal(r['socket-address']?.length, 1, `one listening address: ${JSON.stringify(r)}`);
  return Number(r['socket-address']![0]!.port);
}

test('two migrate-incoming at once from two clients: one is refused, a migration into the other completes', async (t) => {
  const env = new TestEnv(t);
  const { src, dst } = await pair(env);
  const other = await QmpClient.connect(`unix:${dst.qmpPath}`);
  env.onCleanup(() => other.close());
  const results = await Promise.allSettled([
    dst.qmp.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' }),
    other.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' }),
  ]);
  const refused = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
  assert.equal(refused.length, 1, `exactly one migrate-incoming is refused: ${JSON.stringify(results)}`);
  assert.match(String(refused[0]!.reason), /The incoming migration has already been started/);
  const port = await listeningPort(dst);
  await migrateInto(src, dst, port);
  assertNoErrors(src, dst);
});

test('a migrate-incoming that cannot listen (port in use) changes nothing: query-migrate shows none, a retry listens and a migration completes', async (t) => {
  const env = new TestEnv(t);
  const { src, dst } = await pair(env);
  const taken = net.createServer();
  await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
  env.onCleanup(() => new Promise<void>((resolve) => taken.close(() => resolve())));
  const busyPort = (taken.address() as net.AddressInfo).port;
  await assert.rejects(dst.qmp.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${busyPort}` }), /cannot listen for an incoming migration on 127\.0\.0\.1:\d+: .*EADDRINUSE/);
  assert.deepEqual(await dst.qmp.execute('query-migrate'), {}, 'no migration is recorded');
  assert.equal(await dst.status(), 'inmigrate');
  const port = await dst.listenIncoming();
  assert.notEqual(port, busyPort);
  assert.equal(await listeningPort(dst), port);
  await assert.rejects(dst.qmp.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' }), /The incoming migration has already been started/);
  await migrateInto(src, dst, port);
  assertNoErrors(src, dst);
});

/** A third process's listener on a fresh loopback port (it drops whoever connects); closeHolder frees the port (once; also at cleanup). */
async function holdAddress(env: TestEnv): Promise<{ heldPort: number; closeHolder: () => Promise<void> }> {
  const holder = net.createServer((s) => s.destroy());
  await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
  let holderOpen = true;
  const closeHolder = (): Promise<void> => {
    if (!holderOpen) return Promise.resolve();
    holderOpen = false;
    return new Promise<void>((resolve) => holder.close(() => resolve()));
  };
  env.onCleanup(closeHolder);
  return { heldPort: (holder.address() as net.AddressInfo).port, closeHolder };
}

for (const yankAfterGo of [false, true]) {
test(`after go, a --net address held by another process does not lose the guest: the destination completes and runs, warns, and serves once the address is free${yankAfterGo ? ' (a yank on the destination while it waits for the address)' : ''}`, async (t) => {
  const env = new TestEnv(t);
  // A third process holds the destination's service address (in QEMU the NIC backend is
  // opened at start; here it opens after `go`, when the source has already let go of the guest).
  const { heldPort, closeHolder } = await holdAddress(env);
  const srcPort = await freePort();
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.kv, args: ['--net', `listen=127.0.0.1:${srcPort}`, '--memory', '64M'] }),
    env.startVm({ name: 'dst', guest: guests.kv, args: ['--net', `listen=127.0.0.1:${heldPort}`, '--memory', '64M', '--incoming', 'defer'] }),
  ]);
  await src.waitSerial('kv ready');
  const migPort = await dst.listenIncoming();
  const writer = await AckedWriter.start(srcPort, 'held:');
  env.onCleanup(() => writer.stop());
  await waitFor('100 acknowledged writes on the source', () => writer.acked.size >= 100, 20000);
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  if (yankAfterGo) {
    // `go` is out (the source is postmigrate); the destination retries the address for 5 s.
    await waitFor('the source to send go (run state postmigrate)', async () => (await src.status()) === 'postmigrate', 30000, 50);
    assert.equal(await dst.migrationStatus(), 'active', 'the destination is still starting');
    await dst.yankMigration();
  }
  await src.waitMigrationStatus('completed', 30000);
  await writer.ended(); // the switchover resets the connection
  const acked = new Map(writer.acked);
  // The short retry for a source that is slow to free the address (5 s), then the guest runs.
  await dst.waitMigrationStatus('completed', 20000);
  assert.equal(await dst.status(), 'running', 'the destination runs the guest without its service address');
  assert.equal(dst.alive, true);
  assert.match(dst.stderr, / warn .*cannot listen on 127\.0\.0\.1:\d+: .*EADDRINUSE.*the guest runs on, and the front end tries again every \d+ ms until the address is free/);
  assert.deepEqual(statuses(dst), ['setup', 'active', 'completed']);
  // The holder goes: the destination takes the address within a retry period.
  const freedAt = performance.now();
  await closeHolder();
  const c = await RespClient.whenServing(heldPort, 'the destination serving once the address is free', 5000);
  env.onCleanup(() => c.close());
  t.diagnostic(`served ${(performance.now() - freedAt).toFixed(0)} ms after the address was freed`);
  assert.equal(await countMissing(c, acked), 0, 'every acknowledged write is on the destination');
  assert.match(dst.stderr, / info .*serving guest NIC on 127\.0\.0\.1:\d+ \(the address is free again\)/);
  assertNoErrors(src, dst);
});
}

/**
 * A proxy on the main channel that forwards the stream until the source's `go` and then cuts
 * both connections instead: the destination has loaded the whole state but is never told to run.
 */
async function cutAtGo(env: TestEnv, target: number): Promise<{ port: number; cut: Promise<void> }> {
  let onCut!: () => void;
  const cut = new Promise<void>((resolve) => (onCut = resolve));
  const sockets = new Set<net.Socket>();
  const server = net.createServer((from) => {
    const to = net.connect(target, '127.0.0.1');
    for (const s of [from, to]) {
      sockets.add(s);
      s.on('error', () => undefined);
    }
    const dec = new FrameDecoder();
    from.on('data', (d: Buffer) => {
      dec.push(d);
      for (let f = dec.next(); f !== null; f = dec.next()) {
        if (f.type !== FrameType.switchover) continue;
        from.destroy();
        to.destroy();
        onCut();
        return;
      }
      to.write(d);
    });
    to.on('data', (d: Buffer) => from.write(d));
    from.on('end', () => to.end());
    to.on('end', () => from.end());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  env.onCleanup(() => {
    for (const s of sockets) s.destroy();
    return new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return { port: (server.address() as net.AddressInfo).port, cut };
}

test('exit-on-error=false: a migration that breaks after the state was loaded but before go leaves the destination unable to run (inmigrate; cont only sets autostart), as QEMU', async (t) => {
  const env = new TestEnv(t);
  const { src, dst } = await pair(env);
  await dst.qmp.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0', 'exit-on-error': false });
  const proxy = await cutAtGo(env, await listeningPort(dst));
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${proxy.port}` });
  await withTimeout(proxy.cut, 30000, "the source's go, which the proxy cuts");
  const info = await dst.waitMigrationStatus('failed', 10000);
  assert.match(String(info['error-desc']), /CHANNEL_CLOSED/);
  assert.equal(dst.alive, true, 'exit-on-error=false keeps the destination');
  // The guest's other copy may be running (a source that did not get to send go runs on).
  await dst.qmp.execute('cont');
  await assertStill(dst, 500);
  assert.equal(dst.eventsOf('RESUME').length, 0, 'the destination never ran the guest');
  assert.equal(await dst.status(), 'inmigrate', 'the loaded state never became a runnable VM');
});

test('a destination still waiting for its --net address that migrates on gives the address up: once free, the migrated-away VM does not take it', async (t) => {
  const env = new TestEnv(t);
  const { heldPort, closeHolder } = await holdAddress(env);
  const [aPort, cPort] = [await freePort(), await freePort()];
  const [a, b, c] = await Promise.all([
    env.startVm({ name: 'a', guest: guests.kv, args: ['--net', `listen=127.0.0.1:${aPort}`, '--memory', '64M'] }),
    env.startVm({ name: 'b', guest: guests.kv, args: ['--net', `listen=127.0.0.1:${heldPort}`, '--memory', '64M', '--incoming', 'defer'] }),
    env.startVm({ name: 'c', guest: guests.kv, args: ['--net', `listen=127.0.0.1:${cPort}`, '--memory', '64M', '--incoming', 'defer'] }),
  ]);
  await a.waitSerial('kv ready');
  const writer = await AckedWriter.start(aPort, 'on:');
  env.onCleanup(() => writer.stop());
  await waitFor('50 acknowledged writes on a', () => writer.acked.size >= 50, 20000);
  await a.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${await b.listenIncoming()}` });
  await a.waitMigrationStatus('completed', 30000);
  await writer.ended();
  const acked = new Map(writer.acked);
  await b.waitMigrationStatus('completed', 20000);
  await waitFor('b to report that it keeps trying its address', () => /tries again every \d+ ms until the address is free/.test(b.stderr), 5000);
  // b runs the guest without its address, and migrates on.
  await b.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${await c.listenIncoming()}` });
  await b.waitMigrationStatus('completed', 30000);
  await c.waitMigrationStatus('completed', 10000);
  assert.equal(await b.status(), 'postmigrate');
  await closeHolder();
  // Past two retry periods: a b that still tried would have taken the address by now.
  await new Promise((r) => setTimeout(r, 2 * limits.netTakeoverListenRetryMs + 500));
  await assert.rejects(RespClient.connect(heldPort, '127.0.0.1', 2000), /ECONNREFUSED/, 'nobody listens on the address b gave up');
  assert.doesNotMatch(b.stderr, /the address is free again/);
  const client = await RespClient.whenServing(cPort, 'c serving', 5000);
  env.onCleanup(() => client.close());
  assert.equal(await countMissing(client, acked), 0, 'every acknowledged write is on c');
  assertNoErrors(a, b, c);
});
