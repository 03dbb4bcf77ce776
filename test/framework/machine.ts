/** An in-process Machine for tests, with a serial file; destroyed after the test. */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import binaryen from 'binaryen';
import { loadGuest } from '../../src/machine/instrument.js';
import { Machine } from '../../src/machine/machine.js';

export async function machineFor(
  t: { after(fn: () => unknown): void },
  guest: string,
  args: string[],
  opts: { memoryBytes?: number; storeLog?: boolean; drive?: string } = {},
): Promise<{ m: Machine; serial: string; serialText(): string }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-machine-'));
  // Registered before the create: a guest that fails to load leaves no folder behind either.
  let made: Machine | undefined;
  t.after(async () => {
    await made?.destroy();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const serial = path.join(dir, 'serial');
  const m = await Machine.create({
    guest: await loadGuest(guest, { storeLog: opts.storeLog ?? false }),
    memoryBytesMax: opts.memoryBytes ?? 64 * 1024 * 1024,
    args: ['guest', ...args],
    env: [],
    serial: { kind: 'file', path: serial },
    drive: opts.drive === undefined ? null : { path: opts.drive, snapshot: false },
  });
  made = m;
  return { m, serial, serialText: () => fs.readFileSync(serial, 'latin1') };
}

/** Byte of guest RAM that trapGuest waits on. */
export const trapFlagAddr = 1024;

/**
 * A guest that spins until the byte at trapFlagAddr is set (by the test, in guest RAM), then
 * traps (`unreachable`): a guest crash on cue. Written to a temporary file; returns its path.
 */
export function trapGuest(t: { after(fn: () => unknown): void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-trap-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const m = binaryen.parseText(`(module
    (memory (export "memory") 1)
    (func (export "_start")
      (loop $spin (br_if $spin (i32.eqz (i32.load8_u (i32.const ${trapFlagAddr})))))
      unreachable))`);
  try {
    const file = path.join(dir, 'trap.wasm');
    fs.writeFileSync(file, m.emitBinary());
    return file;
  } finally {
    m.dispose();
  }
}

/**
 * A guest built from WebAssembly text (`features`: binaryen feature flags beyond MVP), written
 * to a temporary file; returns its path.
 */
export function watGuest(t: { after(fn: () => unknown): void }, name: string, text: string, features?: number): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-wat-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const m = binaryen.parseText(text);
  try {
    if (features !== undefined) m.setFeatures(features);
    const file = path.join(dir, `${name}.wasm`);
    fs.writeFileSync(file, m.emitBinary());
    return file;
  } finally {
    m.dispose();
  }
}

/** A guest that accepts one client (on its --net listener) and exits with status `code` at once. */
export function exitOnConnectGuest(t: { after(fn: () => unknown): void }, code: number): string {
  return watGuest(t, `exit${code}-on-connect`, `(module
    (import "wasi_snapshot_preview1" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
    (memory (export "memory") 1)
    (func (export "_start")
      (drop (call $accept (i32.const 3) (i32.const 0) (i32.const 64)))
      (call $exit (i32.const ${code}))))`);
}

/** Addresses of sizeHeapGuest's results (i32s). */
export const sizeHeap = { passes: 16, bad: 20, badAddr: 24, grows: 28, clock: 40, regions: 64 } as const;

/** sizeHeapGuest's result words of a VM process (index: address / 4), read with QMP pmemsave. */
export async function sizeHeapWords(vm: { pmem(addr: number, size: number): Promise<Buffer> }): Promise<Uint32Array> {
  return new Uint32Array(new Uint8Array(await vm.pmem(0, 64)).buffer);
}

/**
 * What is wrong with sizeHeapGuest's claims in `ram` (its memory from address 0), which lie one
 * after another from wasm page 1: the first one that does not hold its byte throughout, or null.
 */
export function sizeHeapClaimProblem(ram: Uint8Array, o: { grows: number; pages: number }): string | null {
  for (let k = 0; k < o.grows; k++) {
    const start = (1 + o.pages * k) * 65536;
    if (!ram.subarray(start, start + o.pages * 65536).every((b) => b === 0x41 + k)) return `claim ${k} does not hold 0x${(0x41 + k).toString(16)} throughout`;
  }
  return null;
}

/**
 * A guest that takes its heap as AssemblyScript's allocator does: `memory.size` before and
 * after each `memory.grow(pages)`, claiming everything between; it fills each claim with its
 * own byte (0x41 + k) and waits `paceMs` of its monotonic clock (spinning) before the next
 * grow, then checks every claim forever, counting passes. A byte that changed sets `bad`
 * (sticky) and its address. Claim k is recorded as [start, end) at `regions + 8k`.
 */
export function sizeHeapGuest(t: { after(fn: () => unknown): void }, o: { grows: number; pages: number; paceMs: number }): string {
  const r = sizeHeap;
  return watGuest(t, 'size-heap', `(module
    (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
    (memory (export "memory") 1)
    (func $now (result i64)
      (drop (call $clock (i32.const 1) (i64.const 0) (i32.const ${r.clock})))
      (i64.load (i32.const ${r.clock})))
    (func $pace (local $until i64)
      (local.set $until (i64.add (call $now) (i64.const ${o.paceMs * 1_000_000})))
      (loop $l (br_if $l (i64.lt_u (call $now) (local.get $until)))))
    (func (export "_start") (local $k i32) (local $before i32) (local $after i32) (local $a i32) (local $end i32) (local $v i32)
      (loop $grow
        (local.set $before (i32.shl (memory.size) (i32.const 16)))
        (if (i32.eq (memory.grow (i32.const ${o.pages})) (i32.const -1)) (then unreachable))
        (local.set $after (i32.shl (memory.size) (i32.const 16)))
        (i32.store (i32.add (i32.const ${r.regions}) (i32.shl (local.get $k) (i32.const 3))) (local.get $before))
        (i32.store (i32.add (i32.const ${r.regions + 4}) (i32.shl (local.get $k) (i32.const 3))) (local.get $after))
        (memory.fill (local.get $before) (i32.add (local.get $k) (i32.const 0x41)) (i32.sub (local.get $after) (local.get $before)))
        (local.set $k (i32.add (local.get $k) (i32.const 1)))
        (i32.store (i32.const ${r.grows}) (local.get $k))
        (call $pace)
        (br_if $grow (i32.lt_u (local.get $k) (i32.const ${o.grows}))))
      (loop $pass
        (local.set $k (i32.const 0))
        (loop $claim
          (local.set $a (i32.load (i32.add (i32.const ${r.regions}) (i32.shl (local.get $k) (i32.const 3)))))
          (local.set $end (i32.load (i32.add (i32.const ${r.regions + 4}) (i32.shl (local.get $k) (i32.const 3)))))
          (local.set $v (i32.mul (i32.add (local.get $k) (i32.const 0x41)) (i32.const 0x01010101)))
          (loop $word
            (if (i32.ne (i32.load (local.get $a)) (local.get $v))
              (then
                (i32.store (i32.const ${r.bad}) (i32.const 1))
                (i32.store (i32.const ${r.badAddr}) (local.get $a))))
            (local.set $a (i32.add (local.get $a) (i32.const 4)))
            (br_if $word (i32.lt_u (local.get $a) (local.get $end))))
          (local.set $k (i32.add (local.get $k) (i32.const 1)))
          (br_if $claim (i32.lt_u (local.get $k) (i32.const ${o.grows}))))
        (i32.store (i32.const ${r.passes}) (i32.add (i32.load (i32.const ${r.passes})) (i32.const 1)))
        (br $pass))))`, binaryen.Features.MVP | binaryen.Features.BulkMemory | binaryen.Features.BulkMemoryOpt);
}
