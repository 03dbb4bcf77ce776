/** `colo migrate`: flags → capabilities/parameters, progress, exit status. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { spawn } from 'node:child_process';
import { parseMigrateArgs, progressLine } from '../../src/cli/migrate.js';
import { TestEnv, coloBin, freePort, guests, runProgram, waitFor, withTimeout } from '../framework/harness.js';
import { limits } from '../../src/core/limits.js';
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

test('regression: colo migrate: a second Ctrl-C ends it at once when the source is slow to answer the cancel', async (t) => {
  const env = new TestEnv(t);
  const src = await env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '64M'], guestArgs: ['16M'] });
  env.onCleanup(() => src.kill('SIGCONT'));
  // A destination that takes the connection and never answers: the migration stays in setup.
  const sockets: net.Socket[] = [];
  const server = net.createServer((s) => {
    sockets.push(s);
    s.on('error', () => undefined);
    s.resume();
  });
  env.onCleanup(() => {
    for (const s of sockets) s.destroy();
    server.close();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  const child = spawn(process.execPath, [coloBin, 'migrate', `unix:${src.qmpPath}`, `tcp:127.0.0.1:${port}`], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  env.onCleanup(() => {
    child.kill('SIGKILL');
  });
  // The first progress line comes after `migrate` was sent: the Ctrl-C handler is in place.
  await waitFor('the first progress line of colo migrate', () => /migrate: \[/.test(stderr), 15000);
  // The source stops answering QMP: the cancel and the progress queries wait (up to 10 s each).
  src.kill('SIGSTOP');
  child.kill('SIGINT');
  await waitFor("colo migrate's 'cancelling' line", () => /migrate: cancelling/.test(stderr), 5000);
  const secondAt = Date.now();
  child.kill('SIGINT');
  const end = await withTimeout(exited, 5000, 'colo migrate to end after the second Ctrl-C');
  const ms = Date.now() - secondAt;
  assert.equal(end.signal, 'SIGINT', `ended by the second Ctrl-C (code ${end.code}): ${stderr}`);
  assert.ok(ms < 2000, `ended promptly (took ${ms} ms)`);
});

test('colo migrate of a source with x-colo on: the migration enters COLO and the command says so and ends (status 0), the pair stays in COLO', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const common = ['--memory', '64M', '--net', `listen=127.0.0.1:${port}`];
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.kv, args: common }),
    env.startVm({ name: 'dst', guest: guests.kv, args: [...common, '--incoming', 'defer'] }),
  ]);
  await Promise.all([src.setMigration({ 'x-colo': true }, {}), dst.setMigration({ 'x-colo': true })]);
  await src.waitSerial('kv ready');
  const incoming = await dst.listenIncoming();
  // It used to poll query-migrate for ever: 'colo' never ends as completed, failed or cancelled do.
  const r = await runProgram(process.execPath, [coloBin, 'migrate', `unix:${src.qmpPath}`, `tcp:127.0.0.1:${incoming}`, '--quiet'], { timeoutMs: 30000 });
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^migration entered COLO in \d+ ms/);
  assert.equal(await src.migrationStatus(), 'colo');
  assert.equal(await dst.migrationStatus(), 'colo');
  assertNoErrors(src, dst);
});

test('colo migrate at a port that accepts and never greets (not QMP): fails after limits.qmpShellGreetingTimeoutMs, as colo qmp, with one line and status 1; for the source and for --target-qmp', async (t) => {
  const sockets: net.Socket[] = [];
  const listen = async (onConnection: (s: net.Socket) => void): Promise<net.Server> => {
    const server = net.createServer((s) => {
      sockets.push(s);
      s.on('error', () => undefined);
      onConnection(s);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
    return server;
  };
  t.after(() => {
    for (const s of sockets) s.destroy();
  });
  const port = (server: net.Server): number => (server.address() as net.AddressInfo).port;
  const silent = await listen(() => undefined);
  // A source that is QMP (greets, answers every command), for the --target-qmp case.
  const qmp = await listen((s) => {
    s.write('{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 9}, "package": ""}, "capabilities": ["oob"]}}\r\n');
    let buffered = '';
    s.on('data', (d: Buffer) => {
      buffered += d.toString();
      const lines = buffered.split('\n');
      buffered = lines.pop()!;
      for (const line of lines) {
        if (line.trim() === '') continue;
        const id = (JSON.parse(line) as { id?: unknown }).id;
        s.write(`${JSON.stringify(id === undefined ? { return: {} } : { return: {}, id })}\r\n`);
      }
    });
  });
  const boundMs = limits.qmpShellGreetingTimeoutMs + 2000;
  for (const args of [[`tcp:127.0.0.1:${port(silent)}`, 'tcp:127.0.0.1:4444'], [`tcp:127.0.0.1:${port(qmp)}`, 'tcp:127.0.0.1:4444', '--target-qmp', `tcp:127.0.0.1:${port(silent)}`]]) {
    const t0 = performance.now();
    const r = await runProgram(process.execPath, [coloBin, 'migrate', ...args], { timeoutMs: limits.qmpTimeoutMsDefault + 10000 });
    const ms = performance.now() - t0;
    assert.equal(r.code, 1, `colo migrate ${args.join(' ')}: ${r.stderr}`);
    assert.equal(r.stderr, `colo migrate: no QMP greeting from tcp:127.0.0.1:${port(silent)} within ${limits.qmpShellGreetingTimeoutMs} ms (is it a QMP socket?)\n`);
    assert.ok(ms < boundMs, `colo migrate ${args.join(' ')} took ${ms.toFixed(0)} ms to fail (at most ${boundMs})`);
  }
});
