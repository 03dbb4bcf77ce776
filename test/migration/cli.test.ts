/** `colo migrate`: flags → capabilities/parameters, progress, exit status. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseMigrateArgs, progressLine } from '../../src/cli/migrate.js';
import { TestEnv, coloBin, freePort, guests, runProgram } from '../framework/harness.js';
import { assertAdvancing, assertNoErrors } from './helpers.js';

test('colo migrate parses virsh-style flags', () => {
  const o = parseMigrateArgs(['unix:/a.qmp', 'tcp:10.0.0.2:4444', '--parallel-connections', '4', '--bandwidth=100', '--downtime', '50', '--target-qmp', 'unix:/b.qmp']);
  assert.deepEqual(o, { source: 'unix:/a.qmp', uri: 'tcp:10.0.0.2:4444', target: 'unix:/b.qmp', parallel: true, connections: 4, bandwidthMiB: 100, downtimeMs: 50, quiet: false });
  assert.throws(() => parseMigrateArgs(['unix:/a.qmp']), /usage: colo migrate/);
  assert.throws(() => parseMigrateArgs(['unix:/a.qmp', 'file:/x']), /tcp:HOST:PORT/);
  assert.throws(() => parseMigrateArgs(['unix:/a.qmp', 'tcp:h:1', '--parallel-connections', '99']), /between 1 and 16/);
  assert.throws(() => parseMigrateArgs(['unix:/a.qmp', 'tcp:h:1', '--live']), /unknown option '--live'/);
  const line = progressLine({ status: 'active', ram: { transferred: 3 << 29, total: 1 << 30, remaining: 1 << 28, mbps: 8000, 'dirty-pages-rate': 12, 'dirty-sync-count': 2 } });
  assert.match(line, /\[#{18}\.{6}\]  75%  active  sent 1\.50 GiB  remaining 256\.0 MiB  1\.00 GB\/s  dirty 12 pages\/s  round 3/);
});

test('colo migrate --parallel --target-qmp migrates a running guest to a --incoming tcp: destination', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '64M'], guestArgs: ['16M'] }),
    // Listening from the start; the CLI sets its capabilities while it only listens.
    env.startVm({ name: 'dst', guest: guests.memwalk, args: ['--memory', '64M', '--incoming', `tcp:127.0.0.1:${port}`], guestArgs: ['16M'] }),
  ]);
  await src.waitSerial('B', { count: 3 });
  const r = await runProgram(process.execPath, [coloBin, 'migrate', `unix:${src.qmpPath}`, `tcp:127.0.0.1:${port}`, '--parallel-connections', '2', '--target-qmp', `unix:${dst.qmpPath}`], { timeoutMs: 60000 });
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^migration completed in \d+ ms, downtime \d+ ms, [\d.]+ MiB transferred\n$/);
  assert.match(r.stderr, /migrate: \[#+\] 100%  completed/);
  assert.equal(await src.status(), 'postmigrate');
  const caps = await dst.qmp.execute<{ capability: string; state: boolean }[]>('query-migrate-capabilities');
  assert.ok(caps.some((c) => c.capability === 'multifd' && c.state));
  await assertAdvancing(dst);
  assertNoErrors(src, dst);
});

test('colo migrate: a source that is not there is a failure (status 1, as colo qmp), a bad address a usage error (status 2); one line each', async (t) => {
  const env = new TestEnv(t);
  const gone = env.file('gone.qmp');
  const r = await runProgram(process.execPath, [coloBin, 'migrate', `unix:${gone}`, 'tcp:127.0.0.1:4444'], { timeoutMs: 20000 });
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /^colo migrate: cannot connect to unix:.*gone\.qmp: connect ENOENT/);
  assert.equal(r.stderr.trim().split('\n').length, 1, `one line: ${r.stderr}`);
  for (const args of [['unix:', 'tcp:127.0.0.1:4444'], [`unix:${gone}`, 'tcp:127.0.0.1:99999'], [`unix:${gone}`, 'tcp:127.0.0.1:4444', '--target-qmp', 'nowhere']]) {
    const u = await runProgram(process.execPath, [coloBin, 'migrate', ...args], { timeoutMs: 20000 });
    assert.equal(u.code, 2, `colo migrate ${args.join(' ')}: ${u.stderr}`);
    assert.match(u.stderr, /^colo: bad address/, `colo migrate ${args.join(' ')}`);
    assert.equal(u.stderr.trim().split('\n').length, 1, `one line: ${u.stderr}`);
  }
});

test('colo migrate to a destination that refuses: the progress ends in failed, one line says why, status 1, the source runs on', async (t) => {
  const env = new TestEnv(t);
  const src = await env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '64M'], guestArgs: ['16M'] });
  await src.waitSerial('B', { count: 3 });
  const port = await freePort(); // nothing listens there
  const r = await runProgram(process.execPath, [coloBin, 'migrate', `unix:${src.qmpPath}`, `tcp:127.0.0.1:${port}`], { timeoutMs: 30000 });
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /migrate: \[\.+\]   0%  failed /);
  assert.match(r.stderr, new RegExp(`colo migrate: migration failed: cannot connect to the destination at 127\\.0\\.0\\.1:${port}: connect ECONNREFUSED`));
  assert.equal(r.stdout, '');
  assert.equal(await src.status(), 'running');
  await assertAdvancing(src);
  assertNoErrors(src);
});
