/**
 * Small guests written in WebAssembly text, each the shape of a bug found in review: what the
 * host does with them (WASI calls, load refusals, pauses) on a real Machine.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import binaryen from 'binaryen';
import { sleep, waitFor, withTimeout } from '../framework/harness.js';
import { machineFor, sizeHeap, sizeHeapClaimProblem, sizeHeapGuest, watGuest } from '../framework/machine.js';
import { instrumentVersion, loadGuest } from '../../src/machine/instrument.js';
import { Machine } from '../../src/machine/machine.js';
import { limits } from '../../src/core/limits.js';
import { UsageError } from '../../src/core/errors.js';
import { decodeStateJson, encodeStateJson } from '../../src/core/bytes.js';
import type { VcpuState } from '../../src/machine/vcpu-protocol.js';

const GiB = 1024 * 1024 * 1024;

/** The guest's exit code once it exits; a guest crash rejects, naming it. */
function exitOf(m: Machine): Promise<number> {
  return new Promise((resolve, reject) => {
    m.once('shutdown', resolve);
    m.once('panicked', (message: string) => reject(new Error(`the guest crashed: ${message}`)));
  });
}

test('WASI calls take their i32 arguments unsigned: pointers above 2 GiB work, a clock id of 2^32-1 is EINVAL', async (t) => {
  const file = watGuest(t, 'big', `(module
    (import "wasi_snapshot_preview1" "random_get" (func $rg (param i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "clock_time_get" (func $ct (param i32 i64 i32) (result i32)))
    (import "wasi_snapshot_preview1" "clock_res_get" (func $cr (param i32 i32) (result i32)))
    (memory (export "memory") 1)
    (func (export "_start")
      (i32.store (i32.const 0) (memory.grow (i32.const 33000)))
      (i32.store (i32.const 4) (call $rg (i32.const 0x80001000) (i32.const 16)))
      (i32.store (i32.const 8) (call $ct (i32.const 0) (i64.const 0) (i32.const 0x80002000)))
      (i32.store (i32.const 12) (call $ct (i32.const -1) (i64.const 0) (i32.const 0x100)))
      (i32.store (i32.const 16) (call $cr (i32.const -1) (i32.const 0x100)))))`);
  const { m } = await machineFor(t, file, [], { memoryBytes: 3 * GiB });
  const exited = exitOf(m);
  await m.cont();
  assert.equal(await withTimeout(exited, 20000, 'the guest to exit'), 0);
  const w = new Int32Array(m.memory.buffer, 0, 5);
  assert.notEqual(w[0], -1, 'memory.grow past 2 GiB succeeded');
  assert.equal(w[1], 0, 'random_get at 0x80001000: success, not EFAULT');
  assert.equal(w[2], 0, 'clock_time_get at 0x80002000: success, not EFAULT');
  assert.equal(w[3], 28, 'clock_time_get with clock id 0xffffffff: EINVAL');
  assert.equal(w[4], 28, 'clock_res_get with clock id 0xffffffff: EINVAL');
  const random = new Uint8Array(m.memory.buffer, 0x80001000, 16);
  assert.ok(random.some((b) => b !== 0), 'random_get wrote its 16 bytes at 0x80001000');
  const ns = new DataView(m.memory.buffer).getBigUint64(0x80002000, true);
  const now = BigInt(Date.now()) * 1_000_000n;
  assert.ok(ns > now - 60_000_000_000n && ns <= now + 60_000_000_000n, `clock_time_get wrote the wall clock at 0x80002000 (${ns})`);
});

test('a guest using memory.atomic.wait is refused at load, naming the instruction; notify alone loads', async (t) => {
  const atomics = binaryen.Features.MVP | binaryen.Features.Atomics;
  // Under colo-vm the memory is shared, so this wait would block the vCPU for good (and no
  // pause could stop it); in the original, unshared memory it traps.
  for (const [name, wait] of [
    ['memory.atomic.wait32', '(memory.atomic.wait32 (i32.const 0) (i32.const 0) (i64.const -1))'],
    ['memory.atomic.wait64', '(memory.atomic.wait64 (i32.const 0) (i64.const 0) (i64.const -1))'],
  ] as const) {
    const file = watGuest(t, 'wait', `(module (memory (export "memory") 1 1) (func (export "_start") (drop ${wait})))`, atomics);
    await assert.rejects(loadGuest(file), (err: unknown) => {
      assert.ok(err instanceof Error);
      assert.equal(err.name, 'GuestLoadError');
      assert.equal((err as { code?: string }).code, 'GUEST_FEATURE');
      assert.ok(err.message.includes(name), `the message names ${name}: ${err.message}`);
      return true;
    });
  }
  const notify = watGuest(t, 'notify', `(module (memory (export "memory") 1 1) (func (export "_start") (drop (memory.atomic.notify (i32.const 0) (i32.const 1)))))`, atomics);
  const { m } = await machineFor(t, notify, []);
  const exited = exitOf(m);
  await m.cont();
  assert.equal(await withTimeout(exited, 10000, 'the notify guest to exit'), 0);
});

test('segments outside the initial memory or table are refused at load, naming the segment; an instantiation failure is a prompt load error', async (t) => {
  const cases = [
    // Past the memory: the original fails to instantiate.
    ['data segment 0 ([1048576, 1048577))', `(module (memory (export "memory") 1) (data (i32.const 1048576) "x") (func (export "_start")))`],
    // In the pages colo-vm reserves after the initial memory: instantiating would "work" there.
    ['data segment 0 ([70000, 70001))', `(module (memory (export "memory") 1) (data (i32.const 70000) "x") (func (export "_start")))`],
    ['element segment 0 (1 entries at 5)', `(module (memory (export "memory") 1) (table 1 funcref) (elem (i32.const 5) $f) (func $f) (func (export "_start")))`],
  ] as const;
  for (const [what, text] of cases) {
    const file = watGuest(t, 'segment', text);
    await assert.rejects(withTimeout(machineFor(t, file, []), 20000, `the load of a guest with a bad ${what} to fail`), (err: unknown) => {
      assert.ok(err instanceof Error);
      assert.equal(err.name, 'GuestLoadError');
      assert.equal((err as { code?: string }).code, 'GUEST_SEGMENT');
      assert.ok(err.message.includes(what), `the message names ${what}: ${err.message}`);
      return true;
    });
  }
  // A module the vCPU cannot instantiate (here an instrumented-looking one whose data segment
  // lies past the memory): the vCPU's error reply fails the create, with its reason.
  const crafted = binaryen.parseText(`(module (import "env" "memory" (memory 1 65536 shared)) (export "memory" (memory 0))
    (data (i32.const 0x1000000) "x") (func (export "_start")))`);
  crafted.setFeatures(binaryen.Features.MVP | binaryen.Features.Atomics);
  const wasm = crafted.emitBinary();
  crafted.dispose();
  const create = Machine.create({
    guest: { wasm, moduleHash: 'crafted', instrumentVersion, memory: { initialPages: 1, maximumPages: null }, globals: [], wasiImports: [], dataSegments: [], storeLog: false },
    memoryBytesMax: 64 * 1024 * 1024, args: ['guest'], env: [], serial: { kind: 'none' }, drive: null,
  });
  // Should the create succeed after all (the test then fails), its vCPU thread must not keep the test file running.
  t.after(() => create.then((m) => m.destroy(), () => undefined));
  await assert.rejects(withTimeout(create, 20000, 'Machine.create of a module that cannot be instantiated to fail'), (err: unknown) => {
    assert.ok(err instanceof Error);
    assert.equal(err.name, 'GuestLoadError');
    assert.equal((err as { code?: string }).code, 'GUEST_INSTANTIATE');
    assert.match(err.message, /cannot be instantiated: .*data segment/i);
    return true;
  });
});

test('fd_write whose iovecs name far more than the guest has writes at most fdIoBytesMax: a short count, no huge host copy, no crash', async (t) => {
  // 1024 iovecs of 64 MiB each over a 64 MiB guest: 64 GiB named. The host copied all of it
  // (2 GiB of RSS for 32 iovecs; a RangeError that crashed the guest for 1024).
  const iovecs = limits.iovecsMax;
  const file = watGuest(t, 'bigwrite', `(module
    (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 1024)
    (func (export "_start") (local $i i32)
      (loop $l
        (i32.store (i32.add (i32.const 1024) (i32.mul (local.get $i) (i32.const 8))) (i32.const 0))
        (i32.store (i32.add (i32.const 1028) (i32.mul (local.get $i) (i32.const 8))) (i32.const 67108864))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $l (i32.lt_u (local.get $i) (i32.const ${iovecs}))))
      (i32.store (i32.const 0) (call $w (i32.const 1) (i32.const 1024) (i32.const ${iovecs}) (i32.const 8)))))`);
  const { m, serial } = await machineFor(t, file, [], { memoryBytes: 128 * 1024 * 1024 });
  const rssBefore = process.memoryUsage().rss;
  const exited = exitOf(m);
  await m.cont();
  assert.equal(await withTimeout(exited, 20000, 'the guest to exit (a panic instead is the bug)'), 0);
  const rssGrowth = process.memoryUsage().rss - rssBefore;
  const w = new Uint32Array(m.memory.buffer, 0, 4);
  assert.equal(w[0], 0, 'fd_write succeeded');
  assert.equal(w[2], limits.fdIoBytesMax, 'a short write of fdIoBytesMax bytes');
  assert.equal(fs.statSync(serial).size, limits.fdIoBytesMax, 'the console got exactly those bytes');
  assert.ok(rssGrowth < 1024 * 1024 * 1024, `RSS grew by ${(rssGrowth / 2 ** 20).toFixed(0)} MiB`);
});

test('a guest that writes a buffer larger than fdIoBytesMax to the disk, looping over short writes, ends with the whole buffer on disk', async (t) => {
  const total = 3 * limits.fdIoBytesMax;
  const words = total / 4;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-disk-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const image = path.join(dir, 'd.img');
  fs.writeFileSync(image, Buffer.alloc(total + 1024 * 1024));
  // Word k of the buffer (at 1 MiB) is k. [0]: an errno or 1 for no progress; [4]: calls made.
  const file = watGuest(t, 'diskwrite', `(module
    (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
    (memory (export "memory") ${(total + 2 * 1024 * 1024) / 65536})
    (func (export "_start") (local $k i32) (local $done i32) (local $r i32)
      (loop $fill
        (i32.store (i32.add (i32.const 0x100000) (i32.shl (local.get $k) (i32.const 2))) (local.get $k))
        (local.set $k (i32.add (local.get $k) (i32.const 1)))
        (br_if $fill (i32.lt_u (local.get $k) (i32.const ${words}))))
      (loop $write
        (i32.store (i32.const 16) (i32.add (i32.const 0x100000) (local.get $done)))
        (i32.store (i32.const 20) (i32.sub (i32.const ${total}) (local.get $done)))
        (local.set $r (call $w (i32.const 4) (i32.const 16) (i32.const 1) (i32.const 24)))
        (if (local.get $r) (then (i32.store (i32.const 0) (local.get $r)) (return)))
        (if (i32.eqz (i32.load (i32.const 24))) (then (i32.store (i32.const 0) (i32.const 1)) (return)))
        (i32.store (i32.const 4) (i32.add (i32.load (i32.const 4)) (i32.const 1)))
        (local.set $done (i32.add (local.get $done) (i32.load (i32.const 24))))
        (br_if $write (i32.lt_u (local.get $done) (i32.const ${total}))))))`);
  const { m } = await machineFor(t, file, [], { drive: image });
  const exited = exitOf(m);
  await m.cont();
  assert.equal(await withTimeout(exited, 30000, 'the guest to write its buffer and exit'), 0);
  const w = new Uint32Array(m.memory.buffer, 0, 2);
  assert.equal(w[0], 0, 'every write succeeded and made progress');
  assert.equal(w[1], 3, 'three short writes of fdIoBytesMax');
  const disk = fs.readFileSync(image);
  const got = new Uint32Array(disk.buffer, disk.byteOffset, words);
  let bad = 0;
  for (let k = 0; k < words; k++) if (got[k] !== k) bad++;
  assert.equal(bad, 0, 'the disk holds the whole buffer');
});

test('fd_pread and fd_pwrite take their offset unsigned: one of 2^63 or more is EINVAL and leaves the disk alone, not a write at its start', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-disk-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const image = path.join(dir, 'd.img');
  fs.writeFileSync(image, Buffer.alloc(1024 * 1024, 0x11));
  // [200], [208], [216]: errnos of pwrite at 2^64-4096, pwrite at 2^64-1, pread at 2^64-4096;
  // [204], [212], [220]: the counts (left at 0x5a5a5a5a unless written).
  const file = watGuest(t, 'bigoffset', `(module
    (import "wasi_snapshot_preview1" "fd_pwrite" (func $pw (param i32 i32 i32 i64 i32) (result i32)))
    (import "wasi_snapshot_preview1" "fd_pread" (func $pr (param i32 i32 i32 i64 i32) (result i32)))
    (memory (export "memory") 1)
    (data (i32.const 100) "EVILEVIL")
    (func (export "_start")
      (memory.fill (i32.const 200) (i32.const 0x5a) (i32.const 24))
      (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 8))
      (i32.store (i32.const 200) (call $pw (i32.const 4) (i32.const 0) (i32.const 1) (i64.const -4096) (i32.const 204)))
      (i32.store (i32.const 208) (call $pw (i32.const 4) (i32.const 0) (i32.const 1) (i64.const -1) (i32.const 212)))
      (i32.store (i32.const 0) (i32.const 300))
      (i32.store (i32.const 216) (call $pr (i32.const 4) (i32.const 0) (i32.const 1) (i64.const -4096) (i32.const 220)))))`);
  const { m } = await machineFor(t, file, [], { drive: image });
  const exited = exitOf(m);
  await m.cont();
  assert.equal(await withTimeout(exited, 20000, 'the guest to exit'), 0);
  const w = new Uint32Array(m.memory.buffer, 200, 6);
  assert.deepEqual([...w], [28, 0x5a5a5a5a, 28, 0x5a5a5a5a, 28, 0x5a5a5a5a], 'EINVAL for each, no count written');
  const disk = fs.readFileSync(image);
  assert.equal(disk.byteLength, 1024 * 1024, 'the image kept its size');
  assert.equal(disk.findIndex((b) => b !== 0x11), -1, 'the image is unchanged');
});

/** A guest that grows its memory by 1 MiB, fills it with 0xAB, recurses `depth` calls deep and spins at the bottom ([28] = 1) until [16] is set. */
function deepGuest(t: { after(fn: () => unknown): void }, depth: number): string {
  return watGuest(t, `deep${depth}`, `(module (memory (export "memory") 1)
    (global $sink (mut i32) (i32.const 0))
    (func $rec (param $n i32) (result i32) (local $a i32) (local $b i32)
      (local.set $a (i32.mul (local.get $n) (i32.const 3)))
      (if (i32.eqz (local.get $n))
        (then (i32.store (i32.const 28) (i32.const 1))
              (loop $spin (global.set $sink (i32.add (global.get $sink) (i32.const 1))) (br_if $spin (i32.eqz (i32.load (i32.const 16)))))
              (return (i32.const 1))))
      (local.set $b (call $rec (i32.sub (local.get $n) (i32.const 1))))
      (i32.add (local.get $a) (local.get $b)))
    (func (export "_start") (local $base i32)
      (local.set $base (i32.mul (memory.grow (i32.const 16)) (i32.const 65536)))
      (i32.store (i32.const 24) (local.get $base))
      (memory.fill (local.get $base) (i32.const 0xAB) (i32.const 1048576))
      (i32.store (i32.const 20) (call $rec (i32.const ${depth})))))`);
}

test('pausing a guest whose call stack is too deep for the asyncify area writes nothing outside it and crashes the guest cleanly', async (t) => {
  // 20000 frames of a few locals need several times the area (64 KiB): before, the unwind
  // wrote the frames past it into guest memory, then trapped outside any handler, the pause
  // timed out and the machine said it was running.
  const { m } = await machineFor(t, deepGuest(t, 20000), []);
  const panics: string[] = [];
  m.on('panicked', (message: string) => panics.push(message));
  await m.cont();
  await waitFor('the guest to reach the bottom of its recursion', () => new Uint32Array(m.memory.buffer)[7] === 1, 20000);
  // colo's region is the top of memory: the asyncify area, then the dirty log (not guest data).
  const area = [m.region().asyncifyBase, m.region().asyncifyEnd];
  const before = Buffer.from(m.ram());
  await m.pause(); // a timeout here (TimeoutError) is the bug
  const after = Buffer.from(m.ram());
  assert.equal(after.byteLength, before.byteLength);
  assert.ok(before.subarray(0, area[0]).equals(after.subarray(0, area[0])), 'guest memory below the asyncify area (its data and grown heap) unchanged');
  const heap = new Uint32Array(after.buffer, after.byteOffset)[6]!;
  assert.ok(heap + 1048576 <= area[0]!, `the grown heap [${heap}, +1 MiB) lies below colo's region at ${area[0]}`);
  assert.ok(after.subarray(heap, heap + 1048576).every((b) => b === 0xab), 'the grown heap holds what the guest filled it with');
  assert.equal(m.runState, 'guest-panicked');
  assert.equal(m.running, false);
  assert.equal(panics.length, 1);
  assert.match(panics[0]!, /call stack is too deep to pause/);
  await assert.rejects(m.cont(), { name: 'MachineError', code: 'VM_DEAD' });
});

test('a guest function whose paused frame would exceed asyncifyFrameBytesMax is refused at load', async (t) => {
  // Locals live across a call that may pause are all saved in the frame: 8 bytes each.
  const count = limits.asyncifyFrameBytesMax / 8 + 16;
  const locals = Array.from({ length: count }, (_, i) => `(local $l${i} i64)`).join(' ');
  const sets = Array.from({ length: count }, (_, i) => `(local.set $l${i} (i64.load (i32.const ${i * 8})))`).join(' ');
  let sum = '(i64.const 0)';
  for (let i = 0; i < count; i++) sum = `(i64.add ${sum} (local.get $l${i}))`;
  const file = watGuest(t, 'bigframe', `(module (memory (export "memory") 1)
    (func $f (param $n i32) (result i64) ${locals} ${sets}
      (if (local.get $n) (then (drop (call $f (i32.sub (local.get $n) (i32.const 1))))))
      ${sum})
    (func (export "_start") (i64.store (i32.const 0) (call $f (i32.const 3)))))`);
  await assert.rejects(loadGuest(file), (err: unknown) => {
    assert.ok(err instanceof Error);
    assert.equal((err as { code?: string }).code, 'GUEST_FRAME');
    assert.match(err.message, /asyncifyFrameBytesMax/);
    return true;
  });
});

test('a guest whose call stack fits the asyncify area pauses and resumes where it was', async (t) => {
  const depth = 1000;
  const { m } = await machineFor(t, deepGuest(t, depth), []);
  await m.cont();
  await waitFor('the guest to reach the bottom of its recursion', () => new Uint32Array(m.memory.buffer)[7] === 1, 20000);
  await m.pause();
  assert.equal(m.runState, 'paused');
  new Uint32Array(m.memory.buffer)[4] = 1;
  const exited = exitOf(m);
  await m.cont();
  assert.equal(await withTimeout(exited, 20000, 'the guest to return from its recursion and exit'), 0);
  let want = 1;
  for (let n = 1; n <= depth; n++) want += 3 * n;
  assert.equal(new Uint32Array(m.memory.buffer)[5], want, 'every frame came back with its locals');
});

test('a guest that loops over slow host calls (random_get, disk writes and fsyncs) pauses after the call under way, not after limits.preemptBudget more', async (t) => {
  // One loop back-edge per call: with the budget alone, the pause came after 20000 calls (the
  // pause timed out). [0] counts the calls.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-disk-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const image = path.join(dir, 'd.img');
  fs.writeFileSync(image, Buffer.alloc(8 * 1024 * 1024));
  const bytes = 16 * 1024 * 1024;
  const file = watGuest(t, 'slowcalls', `(module
    (import "wasi_snapshot_preview1" "random_get" (func $r (param i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "fd_pwrite" (func $pw (param i32 i32 i32 i64 i32) (result i32)))
    (import "wasi_snapshot_preview1" "fd_sync" (func $sync (param i32) (result i32)))
    (memory (export "memory") ${bytes / 65536 + 1})
    (func (export "_start")
      (i32.store (i32.const 16) (i32.const 65536)) (i32.store (i32.const 20) (i32.const 4194304))
      (loop $l
        (drop (call $r (i32.const 65536) (i32.const ${bytes})))
        (drop (call $pw (i32.const 4) (i32.const 16) (i32.const 1) (i64.const 0) (i32.const 24)))
        (drop (call $sync (i32.const 4)))
        (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1)))
        (br $l))))`);
  const { m } = await machineFor(t, file, [], { memoryBytes: 64 * 1024 * 1024, drive: image });
  const calls = (): number => new Uint32Array(m.memory.buffer, 0, 1)[0]!;
  await m.cont();
  await waitFor('the first round of calls to return', () => calls() >= 1, 20000, 1);
  const t0 = performance.now();
  const seen = calls();
  await waitFor('the next round to return', () => calls() > seen, 20000, 1);
  const roundMs = performance.now() - t0;
  for (let i = 0; i < 3; i++) {
    const p0 = performance.now();
    await m.pause();
    const pauseMs = performance.now() - p0;
    t.diagnostic(`pause in ${pauseMs.toFixed(0)} ms (a round of calls takes ${roundMs.toFixed(0)} ms)`);
    assert.equal(m.runState, 'paused');
    assert.ok(pauseMs < Math.max(1000, 3 * roundMs), `the pause took ${pauseMs.toFixed(0)} ms; a round of calls takes ${roundMs.toFixed(0)} ms`);
    await m.cont();
    await sleep(20 + i * 30);
  }
});

test('a pause that times out (the guest is in a long host call) leaves the guest running, as its error says: it does not stop later with nobody waiting and query-status saying running', async (t) => {
  // Each call fills 128 MiB with random bytes (about 0.3-1 s): no safe point meanwhile. The
  // pause timeout is lowered for this test so that a pause lands inside one call.
  const tunable = limits as unknown as { pauseTimeoutMs: number };
  const timeoutMs = tunable.pauseTimeoutMs;
  t.after(() => (tunable.pauseTimeoutMs = timeoutMs));
  const bytes = 128 * 1024 * 1024;
  const file = watGuest(t, 'slowcall', `(module
    (import "wasi_snapshot_preview1" "random_get" (func $r (param i32 i32) (result i32)))
    (memory (export "memory") ${bytes / 65536 + 1})
    (func (export "_start")
      (loop $l
        (drop (call $r (i32.const 65536) (i32.const ${bytes})))
        (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1)))
        (br $l))))`);
  const { m } = await machineFor(t, file, [], { memoryBytes: 256 * 1024 * 1024 });
  const calls = (): number => new Uint32Array(m.memory.buffer, 0, 1)[0]!;
  const stops: string[] = [];
  m.on('stop', () => stops.push('stop'));
  await m.cont();
  await waitFor('the first call to return', () => calls() >= 1, 20000, 1);
  // Right after a call returned: the next one is under way.
  const start = performance.now();
  const seen = calls();
  await waitFor('the next call to return', () => calls() > seen, 20000, 1);
  const callMs = performance.now() - start;
  tunable.pauseTimeoutMs = Math.max(1, Math.min(50, callMs / 4));
  await assert.rejects(m.pause(), { name: 'TimeoutError' }, 'the pause finds no safe point in time');
  tunable.pauseTimeoutMs = timeoutMs;
  assert.equal(m.runState, 'running');
  const after = calls();
  await waitFor('the guest to make two more calls', () => calls() >= after + 2, Math.max(5000, 10 * callMs), 5);
  assert.equal(m.running, true, 'the vCPU runs');
  assert.equal(m.runState, 'running');
  assert.deepEqual(stops, [], 'no STOP');
  // A pause with time enough still works.
  await m.pause();
  assert.equal(m.running, false);
  assert.equal(m.runState, 'paused');
  assert.deepEqual(stops, ['stop']);
});

test('a loop whose every iteration fills 64 MiB can be paused: bulk memory operations count against the preemption budget by size', async (t) => {
  // The budget counted iterations only: 20000 fills of 64 MiB before the next preemption point.
  const file = watGuest(t, 'fillloop', `(module (memory (export "memory") 1024)
    (func (export "_start")
      (loop $l (memory.fill (i32.const 0) (i32.const 0) (i32.const 67108864)) (br $l))))`);
  for (const storeLog of [false, true]) {
    const { m } = await machineFor(t, file, [], { storeLog, memoryBytes: 128 * 1024 * 1024 });
    await m.cont();
    await new Promise((r) => setTimeout(r, 100));
    await m.pause(); // rejects with a TimeoutError after limits.pauseTimeoutMs without the charge
    assert.equal(m.runState, 'paused', `storeLog ${storeLog}`);
    await m.cont();
    await m.pause();
    assert.equal(m.runState, 'paused', `storeLog ${storeLog}, a second time`);
  }
});

test("a guest that takes its heap from memory.size around memory.grow (AssemblyScript's way) gets exactly its new pages: colo's region stays out of them through pauses", async (t) => {
  // Before, the region sat above the initial memory and memory.size hid it only until the
  // first grow: this guest's first claim took the asyncify area and the dirty log too, and
  // the host's unwinds and log marks wrote into its data.
  const o = { grows: 24, pages: 2, paceMs: 30 };
  const file = sizeHeapGuest(t, o);
  for (const storeLog of [false, true]) {
    const { m } = await machineFor(t, file, [], { storeLog });
    const word = (addr: number) => new Uint32Array(m.memory.buffer)[addr / 4]!;
    await m.cont();
    // Pause and continue while it grows: each pause saves the guest's call stack in the region.
    let pauses = 0;
    await waitFor('the guest to finish growing, paused and continued on the way', async () => {
      await m.pause();
      pauses++;
      await m.cont();
      return word(sizeHeap.grows) === o.grows;
    }, 20000, 2);
    const passes = word(sizeHeap.passes);
    await waitFor('the guest to check its claims three more times', () => word(sizeHeap.passes) >= passes + 3, 20000);
    await m.pause();
    assert.equal(word(sizeHeap.bad), 0, `storeLog ${storeLog}: the guest found a changed byte at ${word(sizeHeap.badAddr)} (after ${pauses} pauses)`);
    // The claims are the guest's whole memory beyond its first page, one after the other,
    // and colo's region starts where the last one ends.
    const ram = m.ram();
    for (let k = 0; k < o.grows; k++) {
      const [start, end] = [word(sizeHeap.regions + 8 * k), word(sizeHeap.regions + 8 * k + 4)];
      assert.deepEqual([start, end], [(1 + o.pages * k) * 65536, (1 + o.pages * (k + 1)) * 65536], `storeLog ${storeLog}: claim ${k}`);
    }
    assert.equal(sizeHeapClaimProblem(ram, o), null, `storeLog ${storeLog}: the claims`);
    assert.equal(m.region().base, (1 + o.pages * o.grows) * 65536, `storeLog ${storeLog}: colo's region sits right above the guest's memory`);
    assert.ok(pauses >= 3, `only ${pauses} pauses landed while the guest grew`);
    await m.destroy();
  }
});

test('guest arguments and environment above limits.guestArgsBytesMax are a usage error at create; at the limit the guest sees them whole', async (t) => {
  // Prints its argv[1]'s length: args_sizes_get's buffer size minus argv[0] "guest\0".
  const file = watGuest(t, 'args', `(module
    (import "wasi_snapshot_preview1" "args_sizes_get" (func $s (param i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "proc_exit" (func $x (param i32)))
    (memory (export "memory") 1)
    (func (export "_start")
      (drop (call $s (i32.const 0) (i32.const 4)))
      (call $x (i32.sub (i32.load (i32.const 4)) (i32.const 6)))))`);
  const room = limits.guestArgsBytesMax - 'guest\0'.length - 1; // argv[1] and its NUL fill the limit
  await assert.rejects(withTimeout(machineFor(t, file, ['x'.repeat(room + 1)]), 20000, 'the create with too large arguments to fail'), (err: unknown) => {
    assert.ok(err instanceof UsageError, String(err));
    assert.equal(err.code, 'GUEST_ARGS');
    assert.match(err.message, new RegExp(`${limits.guestArgsBytesMax + 1} bytes .*above the limit of ${limits.guestArgsBytesMax}`));
    return true;
  });
  const { m } = await machineFor(t, file, ['x'.repeat(room)]);
  const exited = new Promise<number>((resolve) => m.once('shutdown', resolve));
  await m.cont();
  assert.equal(await withTimeout(exited, 10000, 'the guest to exit'), room + 1, 'argv[1] reaches the guest whole');
});

test('mutable float globals holding Infinity, NaN or -0 (an AssemblyScript guest\'s module-level variables) survive the state codec of migration and COLO', async (t) => {
  // The device state travels as JSON (core/bytes.ts): a global's Infinity or NaN became null,
  // which the target refused (STATE_INVALID: no migration, no COLO checkpoint), and -0 became +0.
  const file = watGuest(t, 'float-globals', `(module
    (memory (export "memory") 1)
    (global $inf (mut f64) (f64.const 0))
    (global $nz (mut f64) (f64.const 0))
    (global $nan (mut f64) (f64.const 0))
    (global $f (mut f32) (f32.const 0))
    (func (export "_start")
      (global.set $inf (f64.div (f64.const 1) (f64.load (i32.const 64))))
      (global.set $nz (f64.neg (f64.load (i32.const 64))))
      (global.set $nan (f64.reinterpret_i64 (i64.const 0x7ff8000000abcdef)))
      (global.set $f (f32.div (f32.const -1) (f32.load (i32.const 64))))
      (i32.store (i32.const 0) (i32.const 1))
      (loop $wait (br_if $wait (i32.eqz (i32.load (i32.const 4)))))
      (f64.store (i32.const 8) (global.get $inf))
      (f64.store (i32.const 16) (global.get $nz))
      (f64.store (i32.const 24) (global.get $nan))
      (f32.store (i32.const 32) (global.get $f))))`);
  const { m: a } = await machineFor(t, file, []);
  await a.cont();
  await waitFor('the guest to set its globals', () => new Uint32Array(a.memory.buffer)[0] === 1, 10000);
  await a.pause();
  const state = decodeStateJson(encodeStateJson({ vcpu: await a.saveVcpu() })) as { vcpu: VcpuState };
  const ram = Buffer.from(a.ram());
  const { m: b } = await machineFor(t, file, []);
  b.growRamTo(ram.byteLength / 65536);
  b.ram().set(ram);
  await b.restoreVcpu(state.vcpu); // refused (STATE_INVALID) was the bug
  new Uint32Array(b.memory.buffer)[1] = 1;
  const exited = exitOf(b);
  await b.cont();
  assert.equal(await withTimeout(exited, 10000, 'the restored guest to exit'), 0);
  const dv = new DataView(b.memory.buffer);
  assert.equal(dv.getFloat64(8, true), Infinity);
  assert.ok(Object.is(dv.getFloat64(16, true), -0), '-0 stays -0');
  // Not its payload: V8 hands a global's value to JS as a number, and canonicalises NaNs on the way.
  assert.ok(Number.isNaN(dv.getFloat64(24, true)), 'the NaN stays a NaN');
  assert.equal(dv.getFloat32(32, true), -Infinity);
});

test("a WASI call whose pointer lies past the guest's memory (in colo's region above it) is EFAULT, as in the original, and clears no dirty mark", async (t) => {
  // The host checked pointers against the whole shared memory, which also holds colo's
  // asyncify area and dirty map above the guest: environ_sizes_get's zero count cleared the
  // map's marks of pages 0-3, and page 0, just written, escaped the next checkpoint.
  const file = watGuest(t, 'region-pointers', `(module
    (import "wasi_snapshot_preview1" "environ_sizes_get" (func $es (param i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "random_get" (func $rg (param i32 i32) (result i32)))
    (memory (export "memory") 1)
    (func (export "_start")
      (i32.store (i32.const 32) (i32.const 7))
      ;; Results in page 2, so that nothing after the first call writes page 0.
      (i32.store (i32.const 8192) (call $es (i32.load (i32.const 64)) (i32.const 12288)))
      (i32.store (i32.const 8196) (call $rg (i32.const 65536) (i32.const 16)))
      (i32.store (i32.const 8200) (call $rg (i32.const 65520) (i32.const 17)))
      (i32.store (i32.const 8204) (call $rg (i32.const 65520) (i32.const 16)))
      (drop (memory.grow (i32.const 1)))
      (i32.store (i32.const 8208) (call $rg (i32.const 65536) (i32.const 16)))
      (i32.store (i32.const 8212) (i32.const 1))
      (loop $wait (br_if $wait (i32.eqz (i32.load (i32.const 8216)))))))`);
  const { m } = await machineFor(t, file, [], { storeLog: true });
  const tracker = m.dirtyTracker();
  new Uint32Array(m.memory.buffer)[16] = m.region().dirtyLogBase; // the guest's pointer at 64
  tracker.reset(m.ram(), m.statePageRanges());
  await m.cont();
  const w = (addr: number) => new Uint32Array(m.memory.buffer)[addr / 4]!;
  await waitFor('the guest to make its calls', () => w(8212) === 1, 10000);
  await m.pause();
  const efault = 21;
  assert.equal(w(8192), efault, 'environ_sizes_get into the dirty map: EFAULT');
  assert.equal(w(8196), efault, 'random_get just past the guest: EFAULT');
  assert.equal(w(8200), efault, "random_get across the guest's end: EFAULT");
  assert.equal(w(8204), 0, "random_get up to the guest's end: success");
  assert.equal(w(8208), 0, 'random_get into the page the guest grew: success');
  assert.ok(tracker.collect(m.ram(), m.statePageRanges()).includes(0), 'page 0, which the guest wrote, is reported dirty');
});

test("a guest asleep in poll_oneoff that is saved and restored elsewhere (a migration, a COLO checkpoint's apply) wakes at its deadline, not a whole timeout after the restore", async (t) => {
  // The relative timeout's start lived only in the vCPU that unwound (WasiHost.pollNow): a
  // restored guest slept its whole timeout again from the restore. A COLO secondary, restored
  // at every checkpoint, then never woke from a sleep longer than x-checkpoint-delay, and one
  // that took over slept up to a whole timeout too long.
  const file = watGuest(t, 'sleeper', `(module
    (import "wasi_snapshot_preview1" "clock_time_get" (func $ct (param i32 i64 i32) (result i32)))
    (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 1)
    (func (export "_start")
      (drop (call $ct (i32.const 1) (i64.const 0) (i32.const 0)))
      (i32.store (i32.const 272) (i32.const 1))
      (i64.store (i32.const 280) (i64.const 1000000000))
      (i32.store (i32.const 24) (call $poll (i32.const 256) (i32.const 512) (i32.const 1) (i32.const 600)))
      (drop (call $ct (i32.const 1) (i64.const 0) (i32.const 8)))
      (i32.store (i32.const 16) (i32.const 1))))`);
  const { m: a } = await machineFor(t, file, []);
  await a.cont();
  await sleep(600);
  await a.pause();
  const state = decodeStateJson(encodeStateJson({ vcpu: await a.saveVcpu() })) as { vcpu: VcpuState };
  const ram = Buffer.from(a.ram());
  assert.equal(new Uint32Array(a.memory.buffer)[4], 0, 'still asleep when saved');
  const { m: b } = await machineFor(t, file, []);
  b.growRamTo(ram.byteLength / 65536);
  b.ram().set(ram);
  await b.restoreVcpu(state.vcpu);
  const exited = exitOf(b);
  await b.cont();
  assert.equal(await withTimeout(exited, 10000, 'the restored guest to wake and exit'), 0);
  const dv = new DataView(b.memory.buffer);
  assert.equal(dv.getUint32(24, true), 0, 'poll_oneoff succeeded');
  const sleptMs = Number(dv.getBigUint64(8, true) - dv.getBigUint64(0, true)) / 1e6;
  assert.ok(sleptMs >= 1000 && sleptMs < 1300, `the guest slept ${sleptMs.toFixed(0)} ms of its own time for a 1000 ms timeout`);
});
