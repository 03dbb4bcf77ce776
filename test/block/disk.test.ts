import { mock, test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { TestEnv, coloBin, guests, runProgram, sleep, waitFor } from '../framework/harness.js';
import { machineFor, watGuest } from '../framework/machine.js';
import { limits } from '../../src/core/limits.js';
import { Disk, DiskIoError, copyImage } from '../../src/block/disk.js';
import { WasiHost, diskFd, type VcpuHooks } from '../../src/machine/wasi-host.js';
import { Clock } from '../../src/machine/devices/clock.js';
import { Serial } from '../../src/machine/devices/serial.js';
import { Nic } from '../../src/net/nic.js';

function image(t: { after(fn: () => void): void }, bytes: number): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-disk-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const p = path.join(dir, 'disk.img');
  fs.writeFileSync(p, crypto.randomBytes(bytes));
  return p;
}

const sha = (p: string) => crypto.createHash('sha256').update(fs.readFileSync(p)).digest('hex');

test('snapshot mode: reads see the writes, the image file never changes', (t) => {
  const p = image(t, 64 * 1024 + 100);
  const before = sha(p);
  const original = fs.readFileSync(p);
  const d = Disk.open(p, { snapshot: true });
  t.after(() => d.close());
  const data = Buffer.from('hello, overlay');
  d.write(data, 4090); // straddles blocks 0 and 1
  const out = Buffer.alloc(30);
  d.read(out, 4080);
  const want = Buffer.from(original.subarray(4080, 4110));
  data.copy(want, 10);
  assert.deepEqual(out, want);
  assert.deepEqual(d.collectDirty(), [0, 1]);
  assert.deepEqual(d.collectDirty(), []);
  assert.deepEqual(d.overlayBlocks(), [0, 1]);
  assert.equal(sha(p), before, 'the image is unchanged');
  // The last, short block.
  const tail = Buffer.alloc(200);
  assert.equal(d.read(tail, 64 * 1024), 100);
  assert.deepEqual(tail.subarray(0, 100), original.subarray(64 * 1024));
});

test('writes past the end are refused; plain mode writes through', (t) => {
  const p = image(t, 8192);
  const d = Disk.open(p, { snapshot: false });
  t.after(() => d.close());
  assert.throws(() => d.write(Buffer.alloc(10), 8190), (e: unknown) => e instanceof DiskIoError);
  d.write(Buffer.from('xyz'), 100);
  assert.equal(fs.readFileSync(p).subarray(100, 103).toString(), 'xyz');
  const copy = Disk.attach(d.spec);
  const b = Buffer.alloc(3);
  copy.read(b, 100);
  assert.equal(b.toString(), 'xyz', 'another thread attached to the spec sees the same disk');
});

test('COLO layer: the guest\'s own writes are dropped at an apply and committed at a takeover', (t) => {
  const p = image(t, 16384);
  const original = fs.readFileSync(p);
  const d = Disk.open(p, { snapshot: false });
  t.after(() => d.close());
  const read = (off: number, n: number): string => {
    const b = Buffer.alloc(n);
    d.read(b, off);
    return b.toString('latin1');
  };
  d.beginLayer();
  d.write(Buffer.from('svm-only'), 5000);
  assert.equal(read(5000, 8), 'svm-only', 'the guest reads its own write');
  assert.deepEqual(fs.readFileSync(p), original, 'the disk underneath is untouched');
  d.writeBlock(0, Buffer.alloc(4096, 0x41)); // a checkpoint's block from the primary
  assert.ok(fs.fstatSync(d.spec.layerFd).size > 0);
  assert.equal(d.dropLayer(), 1);
  assert.equal(fs.fstatSync(d.spec.layerFd).size, 0, 'the layer file is emptied: it never grows past one interval');
  assert.equal(read(5000, 8), original.subarray(5000, 5008).toString('latin1'), 'after the apply the own write is gone');
  assert.equal(read(0, 4), 'AAAA', 'the primary\'s block is there');
  d.write(Buffer.from('kept'), 9000);
  assert.equal(d.commitLayer(), 1);
  assert.equal(fs.fstatSync(d.spec.layerFd).size, 0);
  assert.equal(fs.readFileSync(p).subarray(9000, 9004).toString(), 'kept', 'a takeover commits the own writes');
  d.write(Buffer.from('base'), 12000);
  assert.equal(fs.readFileSync(p).subarray(12000, 12004).toString(), 'base', 'after the commit writes go to the disk');
});

test('a drive that is no image file (a directory in snapshot mode, a FIFO) is refused in one line, without hanging', async (t) => {
  const env = new TestEnv(t);
  const dir = env.file('a-dir');
  fs.mkdirSync(dir);
  const fifo = env.file('a-fifo');
  execFileSync('mkfifo', [fifo]);
  for (const [drive, why] of [[`file=${dir},snapshot=on`, /it is a directory/], [`file=${fifo},snapshot=on`, /not a regular file/], [`file=${fifo}`, /not a regular file/]] as const) {
    // Before, the directory ran with a one-block disk whose every read failed, and the FIFO
    // blocked the open for good (the timeout's failure says so).
    const r = await runProgram(process.execPath, [coloBin, 'run', guests.spin, '--drive', drive], { timeoutMs: 15000 });
    assert.equal(r.code, 1, `--drive ${drive}: ${r.stderr}`);
    assert.match(r.stderr, new RegExp(`cannot open drive '.*': ${why.source} \\(the drive is a raw image file`), drive);
    assert.equal(r.stderr.trim().split('\n').length, 1, `one clear line, got: ${r.stderr}`);
    assert.doesNotMatch(r.stdout, /spin ready/, 'the guest never ran');
  }
});

test('a guest write that runs past the end of the disk is short (POSIX): the bytes that fit are written, EFBIG only when none does', (t) => {
  const p = image(t, 8192 + 100); // the last block is short
  const original = fs.readFileSync(p);
  const d = Disk.open(p, { snapshot: false });
  t.after(() => d.close());
  const memory = new WebAssembly.Memory({ initial: 1, maximum: 1, shared: true });
  const noop = (): void => undefined;
  const hooks: VcpuHooks = {
    finishRewind: () => false, pauseRequested: () => false, startUnwind: noop, drainInput: noop,
    waitForInput: () => false, waitForDiskSpace: () => false, diskWriteDone: noop, output: noop, markWrite: noop,
  };
  const clock = new Clock();
  clock.resume();
  const h = new WasiHost(memory, hooks, { clock, serial: new Serial(null), nic: new Nic(), disk: d }, ['guest'], []);
  const imports = h.imports() as unknown as Record<string, (...a: (number | bigint)[]) => number>;
  const dv = new DataView(memory.buffer);
  const u8 = new Uint8Array(memory.buffer);
  const [iov, nPtr, buf] = [0, 16, 64];
  u8.fill(0x5a, buf, buf + 300);
  dv.setUint32(iov, buf, true);
  dv.setUint32(iov + 4, 300, true);
  const size = 8192 + 100;
  // pwrite of 300 bytes 40 before the end: 40 written.
  dv.setUint32(nPtr, 0xffffffff, true);
  assert.equal(imports.fd_pwrite!(diskFd, iov, 1, BigInt(size - 40), nPtr), 0, 'a straddling pwrite succeeds');
  assert.equal(dv.getUint32(nPtr, true), 40, 'it writes the 40 bytes that fit');
  const after = fs.readFileSync(p);
  assert.equal(after.byteLength, size, 'the image does not grow');
  assert.deepEqual(after.subarray(size - 40), Buffer.alloc(40, 0x5a));
  assert.deepEqual(after.subarray(0, size - 40), original.subarray(0, size - 40), 'nothing else changed');
  // At the end: nothing fits.
  assert.equal(imports.fd_pwrite!(diskFd, iov, 1, BigInt(size), nPtr), 22 /* EFBIG */);
  // fd_write from a position near the end: short, and the position moves by what was written.
  dv.setBigUint64(nPtr, 0n, true);
  assert.equal(imports.fd_seek!(diskFd, BigInt(size - 10), 0 /* set */, nPtr), 0);
  assert.equal(imports.fd_write!(diskFd, iov, 1, nPtr), 0);
  assert.equal(dv.getUint32(nPtr, true), 10);
  assert.equal(imports.fd_write!(diskFd, iov, 1, nPtr), 22 /* EFBIG */, 'the next write, at the end, fits nothing');
});

for (const call of ['fd_pwrite', 'fd_pread'] as const) {
  test(`a guest looping over 1 MiB ${call} calls on its disk pauses at once, not 20000 calls later`, async (t) => {
    const diskBytes = 32 * 1024 * 1024;
    const chunk = 1024 * 1024;
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-disk-'));
    t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
    const img = path.join(dir, 'd.img');
    fs.writeFileSync(img, Buffer.alloc(diskBytes, 1));
    // [0]: calls made. Each loop iteration is one back-edge against the preemption budget;
    // before, nothing else counted, so a pause waited for 20000 calls (20-80 GB of I/O).
    const guest = watGuest(t, call, `(module
      (import "wasi_snapshot_preview1" "${call}" (func $io (param i32 i32 i32 i64 i32) (result i32)))
      (memory (export "memory") ${(chunk + 65536) / 65536})
      (func (export "_start") (local $off i64)
        (i32.store (i32.const 16) (i32.const 65536))
        (i32.store (i32.const 20) (i32.const ${chunk}))
        (loop $io
          (drop (call $io (i32.const 4) (i32.const 16) (i32.const 1) (local.get $off) (i32.const 24)))
          (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1)))
          (local.set $off (i64.rem_u (i64.add (local.get $off) (i64.const ${chunk})) (i64.const ${diskBytes})))
          (br $io))))`);
    const { m } = await machineFor(t, guest, [], { drive: img });
    const calls = (): number => new Int32Array(m.memory.buffer, 0, 1)[0]!;
    for (let round = 0; round < 3; round++) {
      await m.cont();
      const from = calls();
      await waitFor(`the guest to make 20 ${call} calls`, () => calls() >= from + 20, 20000, 5);
      const t0 = performance.now();
      await m.pause(); // fails after limits.pauseTimeoutMs: 'waiting for the vCPU to reach a safe point'
      const ms = performance.now() - t0;
      assert.ok(ms < limits.pauseTimeoutMs / 2, `the pause took ${ms.toFixed(0)} ms`);
      const at = calls();
      await sleep(100);
      assert.equal(calls(), at, 'the paused guest makes no call');
    }
  });
}

test('copyImage (colo up\'s copy back to --drive) flushes the copy before it returns: the source is removed next', (t) => {
  const from = image(t, 3 * 4096 + 100);
  const to = path.join(path.dirname(from), 'drive.img');
  fs.writeFileSync(to, Buffer.alloc(16));
  const synced: string[] = [];
  const real = fs.fsyncSync;
  const fsync = mock.method(fs, 'fsyncSync', (fd: number) => {
    synced.push(fs.readlinkSync(`/proc/self/fd/${fd}`));
    real(fd);
  });
  t.after(() => fsync.mock.restore());
  copyImage(from, to);
  assert.equal(sha(to), sha(from), 'the drive holds the copy');
  assert.ok(synced.includes(to), `the copy was flushed (fsync of ${to}; fsyncs seen: ${JSON.stringify(synced)})`);
});

test('COLO layer: a takeover\'s commit whose flush fails writes every block again when it is retried, not only flushes', (t) => {
  const p = image(t, 16384);
  const d = Disk.open(p, { snapshot: false });
  t.after(() => d.close());
  d.beginLayer();
  d.write(Buffer.from('first'), 100);
  d.write(Buffer.from('second'), 9000);
  const imageWrites: number[] = [];
  const realWrite = fs.writeSync;
  const write = mock.method(fs, 'writeSync', (fd: number, ...rest: unknown[]) => {
    if (fd === d.spec.imageFd) imageWrites.push(rest[3] as number);
    return (realWrite as (...a: unknown[]) => number)(fd, ...rest);
  });
  t.after(() => write.mock.restore());
  let failures = 1;
  const realSync = fs.fsyncSync;
  const fsync = mock.method(fs, 'fsyncSync', (fd: number) => {
    if (fd === d.spec.imageFd && failures > 0) {
      failures--;
      throw Object.assign(new Error('EIO: i/o error, fsync'), { code: 'EIO' });
    }
    realSync(fd);
  });
  t.after(() => fsync.mock.restore());
  assert.throws(() => d.commitLayer(), (e: unknown) => e instanceof DiskIoError && e.code === 'DISK_IO' && /flushing/.test(e.message));
  assert.deepEqual(imageWrites, [0, 8192], 'the first attempt wrote both blocks');
  imageWrites.length = 0;
  // Before, the blocks had left the layer at the failed attempt: the retry wrote nothing,
  // flushed, and reported 0 blocks committed.
  assert.equal(d.commitLayer(), 2, 'the retry commits both blocks');
  assert.deepEqual(imageWrites, [0, 8192], 'the retry wrote both blocks again before its flush');
  assert.equal(fs.readFileSync(p).subarray(100, 105).toString(), 'first');
  assert.equal(fs.readFileSync(p).subarray(9000, 9006).toString(), 'second');
});
