/**
 * A host disk error other than a full filesystem reaches the guest as EIO, as QEMU's default
 * werror=enospc / rerror=report gives it: each one a BLOCK_IO_ERROR with action report, the VM
 * running on, and a rate-limited warning. Before, the guest saw EIO and the management saw
 * nothing at all. The error is real: the `colo run` process gets a file size limit (prlimit
 * RLIMIT_FSIZE), so its writes past it fail with EFBIG (Node ignores SIGXFSZ).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { TestEnv, runProgram, waitFor } from '../framework/harness.js';
import { watGuest } from '../framework/machine.js';

const limitBytes = 1024 * 1024;

test('a guest disk write that fails on the host (EFBIG) is EIO to the guest, BLOCK_IO_ERROR action report each time, one warning, and the VM runs on', async (t) => {
  const env = new TestEnv(t);
  // Three writes past the limit, then one below it; each result as one byte ('0' + errno) on
  // the console, then it spins.
  const guest = watGuest(t, 'diskerr', `(module
    (import "wasi_snapshot_preview1" "fd_pwrite" (func $pw (param i32 i32 i32 i64 i32) (result i32)))
    (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 1)
    (func $out (param $r i32)
      (i32.store8 (i32.const 64) (i32.add (local.get $r) (i32.const 48)))
      (i32.store (i32.const 16) (i32.const 64)) (i32.store (i32.const 20) (i32.const 1))
      (drop (call $w (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24))))
    (func (export "_start") (local $i i32)
      (memory.fill (i32.const 1024) (i32.const 120) (i32.const 4096))
      (i32.store (i32.const 0) (i32.const 1024)) (i32.store (i32.const 4) (i32.const 4096))
      (loop $l
        (call $out (call $pw (i32.const 4) (i32.const 0) (i32.const 1) (i64.const ${limitBytes + 4096}) (i32.const 8)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $l (i32.lt_u (local.get $i) (i32.const 3))))
      (call $out (call $pw (i32.const 4) (i32.const 0) (i32.const 1) (i64.const 0) (i32.const 8)))
      (loop $spin (br $spin))))`);
  const image = env.image('disk.img', 2 * limitBytes);
  const vm = await env.startVm({ name: 'vm', guest, args: ['-S', '--drive', `file=${image}`] });
  const limit = await runProgram('prlimit', ['--pid', String(vm.child.pid), `--fsize=${limitBytes}:${limitBytes}`], { timeoutMs: 10000 });
  assert.equal(limit.code, 0, `prlimit: ${limit.stderr}`);
  const mark = vm.qmp.eventCount;
  await vm.qmp.execute('cont');
  await waitFor('the guest to print the four results', () => vm.serial().length >= 4, 10000);
  assert.equal(vm.serial(), 'MMM0', 'three writes past the limit are EIO (29), the one below it goes through');
  const events = await waitFor('three BLOCK_IO_ERROR events', () => (vm.eventsOf('BLOCK_IO_ERROR', mark).length >= 3 ? vm.eventsOf('BLOCK_IO_ERROR', mark) : false), 5000);
  assert.equal(events.length, 3);
  for (const ev of events) {
    const { reason, ...rest } = ev.data as Record<string, unknown>;
    assert.deepEqual(rest, { device: 'drive0', 'node-name': 'drive0', operation: 'write', action: 'report', nospace: false });
    assert.match(String(reason), /EFBIG|too large/);
  }
  assert.equal(await vm.status(), 'running', 'an error reported to the guest does not stop the VM');
  assert.equal(vm.eventsOf('STOP', mark).length, 0);
  const warnings = vm.stderr.split('\n').filter((l) => /guest disk write failed/.test(l));
  assert.equal(warnings.length, 1, `one warning for three errors in a row: ${warnings.join(' | ')}`);
  assert.match(warnings[0]!, / warn .*EFBIG.*EIO/);
  const disk = fs.readFileSync(image);
  assert.equal(disk.subarray(0, 4096).toString('latin1'), 'x'.repeat(4096), 'the write below the limit is on the disk');
  assert.ok(disk.subarray(limitBytes).every((b) => b === 0), 'nothing was written past the limit');
});
