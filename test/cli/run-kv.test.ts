import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { spawn } from 'node:child_process';
import { TestEnv, freePort, guests, runProgram, waitFor } from '../framework/harness.js';
import { AckedWriter, RespClient, countMissing } from '../framework/resp.js';

test('kv.wasm serves redis-cli and redis-benchmark', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const disk = env.image('kv.img', 16 * 1024 * 1024);
  const vm = await env.startVm({ name: 'kv', guest: guests.kv, args: ['--net', `listen=127.0.0.1:${port}`, '--drive', `file=${disk}`, '--memory', '256M'] });
  await vm.waitSerial('kv ready');
  const set = await runProgram('redis-cli', ['-p', String(port), 'set', 'k', 'v'], { timeoutMs: 10000 });
  assert.equal(set.stdout.trim(), 'OK');
  const get = await runProgram('redis-cli', ['-p', String(port), 'get', 'k'], { timeoutMs: 10000 });
  assert.equal(get.stdout.trim(), 'v');
  const bench = await runProgram('redis-benchmark', ['-p', String(port), '-q', '-n', '20000'], { timeoutMs: 240000 });
  assert.equal(bench.code, 0, bench.stderr);
  const lines = bench.stdout.split(/\r|\n/).filter((l) => /requests per second/.test(l));
  t.diagnostic(lines.join('\n'));
  assert.ok(lines.length >= 15, `redis-benchmark ran ${lines.length} tests: ${bench.stdout.slice(-500)}`);
  assert.doesNotMatch(bench.stdout + bench.stderr, /ERR|error/i);
  assert.deepEqual(vm.errorLines(), []);
});

test('migrate to a file under load, restore in a new process: every acknowledged key is there', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const disk = env.image('kv.img', 16 * 1024 * 1024);
  const stateFile = env.file('kv.state');
  const netArgs = ['--net', `listen=127.0.0.1:${port}`, '--drive', `file=${disk}`, '--memory', '256M'];
  const src = await env.startVm({ name: 'src', guest: guests.kv, args: netArgs });
  await src.waitSerial('kv ready');

  // Background load from a real client, and our own writer that records what was acknowledged.
  const bench = spawn('redis-benchmark', ['-p', String(port), '-q', '-n', '200000', '-t', 'set,incr,lpush', '-r', '1000'], { stdio: 'ignore' });
  let benchError: Error | null = null;
  bench.once('error', (err) => (benchError = err));
  env.onCleanup(() => {
    bench.kill('SIGKILL');
  });
  const writer = await AckedWriter.start(port, 'mig:');
  env.onCleanup(() => writer.stop());
  const acked = writer.acked;
  await waitFor('some acknowledged writes', () => acked.size >= 200, 20000);
  // The migration is under load only if the load is there: a missing or failed redis-benchmark fails the test.
  assert.equal(benchError, null, 'redis-benchmark started');
  assert.ok(bench.exitCode === null && bench.signalCode === null, `redis-benchmark still loads the VM when the migration starts (it exited with ${bench.exitCode ?? bench.signalCode})`);
  await src.qmp.execute('migrate', { uri: `file:${stateFile}` });
  await src.waitMigrationStatus('completed', 60000);
  assert.equal(await src.status(), 'postmigrate');
  const ackedAtSwitch = new Map(acked);
  await writer.stop();
  bench.kill('SIGKILL');
  await src.stop();

  const dst = await env.startVm({ name: 'dst', guest: guests.kv, args: [...netArgs, '--incoming', `file:${stateFile}`] });
  await waitFor('the restored VM to run', async () => (await dst.status()) === 'running', 20000);
  const reader = await RespClient.whenServing(port, 'a connection to the restored VM');
  env.onCleanup(() => reader.close());
  const missing = await countMissing(reader, ackedAtSwitch);
  assert.equal(missing, 0, `${missing} of ${ackedAtSwitch.size} acknowledged keys are missing after the restore`);
  assert.equal(await reader.command(['SET', 'after', 'restore']), 'OK');
  assert.equal(await reader.command(['GET', 'after']), 'restore');
  t.diagnostic(`${ackedAtSwitch.size} acknowledged keys checked`);
  assert.deepEqual(src.errorLines(), []);
  assert.deepEqual(dst.errorLines(), []);
});

test('memwalk saved mid-pass resumes from the same page (pmemsave before and after are identical)', async (t) => {
  const env = new TestEnv(t);
  const stateFile = env.file('mw.state');
  const src = await env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '64M'], guestArgs: ['8M'] });
  await src.waitSerial('B', { count: 3 });
  const region = /memwalk start=0x([0-9a-f]+) size=(\d+)/.exec(src.serial());
  assert.ok(region);
  const start = parseInt(region[1]!, 16);
  const size = Number(region[2]);
  const mark = src.qmp.eventCount;
  await src.qmp.execute('migrate', { uri: `file:${stateFile}` });
  await src.waitMigrationStatus('completed');
  await src.qmp.waitEvent('STOP', { after: mark, timeoutMs: 5000 });
  const statuses = src.qmp.events.filter((e) => e.index >= mark && e.event === 'MIGRATION').map((e) => e.data.status);
  assert.deepEqual(statuses, ['setup', 'active', 'device', 'completed']);
  const before = await src.pmem(start, size);
  await src.stop();
  const dst = await env.startVm({ name: 'dst', guest: guests.memwalk, args: ['--memory', '64M', '-S', '--incoming', `file:${stateFile}`], guestArgs: ['8M'] });
  const after = await dst.pmem(start, size);
  assert.ok(before.equals(after), 'guest memory after restore equals guest memory at save');
  assert.equal(await dst.status(), 'paused');
  const resumeMark = dst.qmp.eventCount;
  await dst.qmp.execute('cont');
  await dst.qmp.waitEvent('RESUME', { after: resumeMark, timeoutMs: 5000 });
  const passes = dst.serial().length;
  await dst.waitSerial('B', { count: 2, fromOffset: passes });
  const later = await dst.pmem(start, size);
  assert.ok(!later.equals(after), 'the restored guest runs on');
  // memsave (what vCPU 0 sees at virtual addresses) is the same bytes: one vCPU, one linear memory.
  await dst.qmp.execute('stop');
  const file = env.file('mw.memsave');
  await dst.qmp.execute('memsave', { val: start, size, filename: file });
  const virt = fs.readFileSync(file);
  assert.equal(virt.length, size);
  assert.ok(virt.equals(await dst.pmem(start, size)), 'memsave equals pmemsave of a stopped guest');
  await dst.qmp.execute('memsave', { val: start, size: 16, filename: file, 'cpu-index': 0 });
  assert.ok(fs.readFileSync(file).equals(virt.subarray(0, 16)));
  await assert.rejects(dst.qmp.execute('memsave', { val: start, size: 16, filename: file, 'cpu-index': 1 }), /Parameter 'cpu-index' expects a CPU number/);
  await assert.rejects(dst.qmp.execute('memsave', { val: 0, size: 2 ** 40, filename: file }), /Invalid addr/);
});
