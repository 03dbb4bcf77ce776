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
  const serial = path.join(dir, 'serial');
  const m = await Machine.create({
    guest: await loadGuest(guest, { storeLog: opts.storeLog ?? false }),
    memoryBytesMax: opts.memoryBytes ?? 64 * 1024 * 1024,
    args: ['guest', ...args],
    env: [],
    serial: { kind: 'file', path: serial },
    drive: opts.drive === undefined ? null : { path: opts.drive, snapshot: false },
  });
  t.after(async () => {
    await m.destroy();
    fs.rmSync(dir, { recursive: true, force: true });
  });
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
