/**
 * migrate-incoming on a `--incoming defer` destination: one incoming migration at a time,
 * and a start that fails changes nothing, so it can be tried again.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { QmpClient } from '../../src/control/qmp-client.js';
import { TestEnv, guests, memwalkRegion, type VmProcess } from '../framework/harness.js';
import { assertAdvancing, assertNoErrors } from './helpers.js';

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
