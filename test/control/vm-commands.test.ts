/**
 * QMP commands of a `colo run` process (control/vm.ts, control/commands.ts) against real
 * processes: stop and the run states it must leave alone, pmemsave while other clients ask,
 * quit's SHUTDOWN event.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { QmpClient } from '../../src/control/qmp-client.js';
import { limits } from '../../src/core/limits.js';
import { TestEnv, guests, runProgram, sleep, waitFor, withTimeout } from '../framework/harness.js';
import { watGuest } from '../framework/machine.js';
import { assertAdvancing, assertStill, memwalkPair } from '../migration/helpers.js';

test('stop leaves a migrated-away source in postmigrate: cont and migrate stay refused, the guest never runs again', async (t) => {
  const env = new TestEnv(t);
  const src = await env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '32M'], guestArgs: ['4M'] });
  await src.waitSerial('B', { count: 2 });
  // stop on a running VM pauses it (one STOP); a second stop changes nothing.
  const mark = src.qmp.eventCount;
  await src.qmp.execute('stop');
  assert.equal(await src.status(), 'paused');
  await src.qmp.execute('stop');
  assert.equal(await src.status(), 'paused');
  assert.equal(src.eventsOf('STOP', mark).length, 1);
  await src.qmp.execute('cont');
  await src.waitSerial('B', { count: 2, fromOffset: src.serial().length });

  await src.qmp.execute('migrate', { uri: `file:${env.file('src.state')}` });
  await src.waitMigrationStatus('completed');
  assert.equal(await src.status(), 'postmigrate');
  await assert.rejects(src.qmp.execute('cont'), /the VM cannot run in state postmigrate/);
  // QEMU's stop succeeds on a VM that does not run and leaves its state as it is.
  assert.deepEqual(await src.qmp.execute('stop'), {});
  assert.equal(await src.status(), 'postmigrate');
  await assert.rejects(src.qmp.execute('cont'), /the VM cannot run in state postmigrate/);
  await assert.rejects(src.qmp.execute('migrate', { uri: `file:${env.file('again.state')}` }), /cannot migrate a VM in state postmigrate/);
  await assertStill(src);
  assert.equal(src.eventsOf('RESUME', mark).length, 1, 'the only RESUME is the cont before the migration');
});

test('stop and cont on an --incoming defer VM only clear and set autostart (as QEMU in inmigrate): it stays inmigrate, the last one decides, and after stop the migrated guest arrives paused', async (t) => {
  const env = new TestEnv(t);
  const { src, dst, port } = await memwalkPair(env, { region: '8M', memory: '32M' });
  const dstMark = dst.qmp.eventCount;
  assert.deepEqual(await dst.qmp.execute('stop'), {});
  assert.equal(await dst.status(), 'inmigrate');
  // QEMU's qmp_cont in inmigrate sets autostart; it used to be refused ("Migration is not finalized yet").
  assert.deepEqual(await dst.qmp.execute('cont'), {});
  assert.equal(await dst.status(), 'inmigrate');
  assert.deepEqual(await dst.qmp.execute('stop'), {});
  assert.equal(await dst.status(), 'inmigrate');
  assert.equal(dst.serial(), '', 'no fresh guest ran on the destination');
  assert.equal(dst.eventsOf('RESUME', dstMark).length + dst.eventsOf('STOP', dstMark).length, 0, 'no run-state change while waiting');

  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  await src.waitMigrationStatus('completed');
  await dst.waitMigrationStatus('completed');
  // As with -S: the guest was running on the source, but the destination waits for cont.
  assert.equal(await dst.status(), 'paused');
  await assertStill(dst);
  assert.equal(dst.eventsOf('RESUME', dstMark).length, 0, 'the destination did not run the guest');
  await dst.qmp.execute('cont');
  await dst.waitEvent('RESUME', { after: dstMark, timeoutMs: 5000 });
  await assertAdvancing(dst);
});

test('cont on a -S destination while its incoming migration loads sets autostart (as QEMU): the migrated guest runs on arrival, no cont after', async (t) => {
  const env = new TestEnv(t);
  // Slowed: the migration is surely still loading when cont comes.
  const { src, dst, port } = await memwalkPair(env, { region: '8M', memory: '32M', dstArgs: ['-S'], parameters: { 'max-bandwidth': 4 * 1024 * 1024 } });
  const dstMark = dst.qmp.eventCount;
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  await dst.waitEvent('MIGRATION', { after: dstMark, where: (e) => e.data.status === 'active', timeoutMs: 10000 });
  assert.equal(await dst.status(), 'inmigrate');
  assert.deepEqual(await dst.qmp.execute('cont'), {});
  assert.equal(await dst.status(), 'inmigrate', 'cont does not start a half-loaded guest');
  assert.equal(await dst.migrationStatus(), 'active', 'cont came while the migration was loading');
  assert.equal(dst.eventsOf('RESUME', dstMark).length, 0);
  await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
  await src.waitMigrationStatus('completed', 30000);
  await dst.waitMigrationStatus('completed', 10000);
  await dst.waitEvent('RESUME', { after: dstMark, timeoutMs: 5000 });
  assert.equal(await dst.status(), 'running');
  assert.equal(dst.eventsOf('RESUME', dstMark).length, 1);
  await assertAdvancing(dst);
  assert.equal(await src.status(), 'postmigrate');
});

test('pmemsave writes guest memory byte for byte, and other clients are answered while it is in progress', async (t) => {
  const env = new TestEnv(t);
  const vm = await env.startVm({ name: 'vm', guest: guests.memwalk, args: ['--memory', '64M'], guestArgs: ['24M'] });
  await vm.waitSerial('B', { count: 2 });
  await vm.qmp.execute('stop');
  const ramBytes = (await vm.qmp.execute<{ 'base-memory': number }>('query-memory-size-summary'))['base-memory'];
  // An odd start and length, over several chunks.
  const addr = 4097;
  const size = ramBytes - addr - 3;
  assert.ok(size > 3 * limits.pmemsaveChunkBytes, `guest RAM of ${ramBytes} bytes spans several chunks`);
  const expected = await vm.pmem(addr, size);

  // Into a FIFO nobody reads yet: the pmemsave stays in progress, deterministically, until the
  // test opens the reading end.
  const fifo = env.file('ram.fifo');
  const mk = await runProgram('mkfifo', [fifo], { timeoutMs: 5000 });
  assert.equal(mk.code, 0, mk.stderr);
  let saved = false;
  const save = vm.qmp.execute('pmemsave', { val: addr, size, filename: fifo }, { timeoutMs: 30000 }).finally(() => (saved = true));
  save.catch(() => undefined); // awaited below; a rejection before then must not be unhandled
  const other = await QmpClient.connect(`unix:${vm.qmpPath}`);
  env.onCleanup(() => other.close());
  const status = await other.execute<{ status: string }>('query-status', {}, { timeoutMs: 5000 });
  assert.equal(status.status, 'paused');
  assert.equal(saved, false, 'query-status was answered while the pmemsave was still writing');

  const chunks: Buffer[] = [];
  const reader = fs.createReadStream(fifo);
  env.onCleanup(() => {
    reader.destroy();
  });
  const read = new Promise<Buffer>((resolve, reject) => {
    reader.on('data', (c) => chunks.push(c as Buffer));
    reader.once('end', () => resolve(Buffer.concat(chunks)));
    reader.once('error', reject);
  });
  assert.deepEqual(await save, {});
  const got = await withTimeout(read, 10000, 'the end of the pmemsave data in the FIFO');
  assert.equal(got.length, size);
  assert.ok(got.equals(expected), 'the FIFO received exactly the guest memory');
  // Errors stay typed, with QEMU's wording.
  await assert.rejects(vm.qmp.execute('pmemsave', { val: 0, size: 16, filename: env.file('no/such/dir/x') }), /writing to file '.*no\/such\/dir\/x' failed: ENOENT/);
});

test('quit: the reply, then SHUTDOWN {guest: false, reason: host-qmp-quit} to every client, then the process exits 0', async (t) => {
  const env = new TestEnv(t);
  const vm = await env.startVm({ name: 'vm', guest: guests.spin });
  const other = await QmpClient.connect(`unix:${vm.qmpPath}`);
  env.onCleanup(() => other.close());
  const mark = vm.qmp.eventCount;
  const otherMark = other.eventCount;
  assert.deepEqual(await vm.qmp.execute('quit'), {});
  for (const [c, after] of [[vm.qmp, mark], [other, otherMark]] as const) {
    const ev = await c.waitEvent('SHUTDOWN', { after, timeoutMs: 5000 });
    assert.deepEqual(ev.data, { guest: false, reason: 'host-qmp-quit' });
  }
  assert.equal(await vm.waitExit(10000), 0);
  assert.equal(vm.eventsOf('SHUTDOWN', mark).length, 1);
});

test('a guest writing to --serial stdio that nobody reads waits quietly in its write: stop pauses it at once, and after cont and a reader the output goes on whole', async (t) => {
  const env = new TestEnv(t);
  // Writes 4 KiB of 'A' to stdout in a loop.
  const guest = watGuest(t, 'console', `(module
    (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 1)
    (func (export "_start")
      (memory.fill (i32.const 4096) (i32.const 65) (i32.const 4096))
      (i32.store (i32.const 0) (i32.const 4096)) (i32.store (i32.const 4) (i32.const 4096))
      (loop $l (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16))) (br $l))))`);
  const vm = await env.startVm({ name: 'vm', guest, args: ['--serial', 'stdio'] });
  await waitFor('the guest to write to stdout', () => vm.stdout.length > 0, 10000);
  // Nobody reads the process's stdout from now on: the pipe fills.
  vm.child.stdout!.pause();
  await sleep(500);
  // The vCPU spun on EAGAIN: a whole core, and no safe point for a pause.
  const ticks = (): number => {
    const f = fs.readFileSync(`/proc/${vm.child.pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    return Number(f[11]) + Number(f[12]);
  };
  const t0 = ticks();
  await sleep(1000);
  const used = ticks() - t0;
  t.diagnostic(`${used} clock ticks of CPU in 1 s with stdout full`);
  assert.ok(used < 30, `the process used ${used} clock ticks of CPU in 1 s while its stdout was full`);
  const p0 = performance.now();
  await vm.qmp.execute('stop');
  const pauseMs = performance.now() - p0;
  assert.ok(pauseMs < 1000, `stop took ${pauseMs.toFixed(0)} ms`);
  assert.equal(await vm.status(), 'paused');
  await vm.qmp.execute('cont');
  const before = vm.stdout.length;
  vm.child.stdout!.resume();
  await waitFor('more output once stdout is read', () => vm.stdout.length > before + 1024 * 1024, 10000);
  assert.match(vm.stdout, /^A+$/, 'the output holds only the bytes the guest wrote');
});
