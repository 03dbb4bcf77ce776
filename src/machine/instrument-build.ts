/**
 * Building an instrumented guest with binaryen (see instrument.ts for what it becomes). A
 * module of its own so that a process whose guest is in the cache never loads binaryen:
 * loading it takes about half a second, and its memory stays for the life of the process
 * (a kv.wasm VM's RSS was about 110 MB larger with it).
 */
import binaryen from 'binaryen';
import { GuestLoadError, errorMessage } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { memoryToImport, wasiModule, withoutCustomSections } from './instrument-binary.js';
import {
  asyncifyExports,
  blockingWasiImports,
  checkGuest,
  checkOutput,
  growImport,
  importedMemoryMaximumPages,
  instrumentVersion,
  instrumentedGlobals,
  log2,
  memoryImport,
  preemptImport,
  sha256,
  type InstrumentedGuest,
} from './instrument.js';
import { boundAsyncifyStack, instrumentFunctions } from './instrument-walk.js';

/** Features given to binaryen: what V8 11.3 accepts and colo-vm supports. Never Features.All. */
export const guestFeatures =
  binaryen.Features.MVP |
  binaryen.Features.MutableGlobals |
  binaryen.Features.SignExt |
  binaryen.Features.BulkMemory |
  // binaryen asserts that bulk-memory implies its memory.copy/fill subset.
  binaryen.Features.BulkMemoryOpt |
  binaryen.Features.NontrappingFPToInt |
  binaryen.Features.Atomics;

/** A name not yet used by any global or function of `m`. */
function freshName(m: binaryen.Module, base: string): string {
  let name = base;
  for (let i = 1; m.getGlobal(name) !== 0 || m.getFunction(name) !== 0; i++) name = `${base}${i}`;
  return name;
}

/** Runs `fn` with binaryen's process-wide settings set for instrumentation, restoring them after. */
function withBinaryenSettings<T>(fn: () => T): T {
  const saved = {
    optimize: binaryen.getOptimizeLevel(),
    shrink: binaryen.getShrinkLevel(),
    debug: binaryen.getDebugInfo(),
    asyncifyImports: binaryen.getPassArgument('asyncify-imports'),
  };
  try {
    binaryen.setOptimizeLevel(2);
    binaryen.setShrinkLevel(0);
    binaryen.setDebugInfo(false);
    return fn();
  } finally {
    binaryen.setOptimizeLevel(saved.optimize);
    binaryen.setShrinkLevel(saved.shrink);
    binaryen.setDebugInfo(saved.debug);
    binaryen.setPassArgument('asyncify-imports', saved.asyncifyImports ?? '');
  }
}

/**
 * Instruments a WASI preview1 command module (see instrument.ts's file comment). Throws GuestLoadError
 * for a module colo-vm cannot run: GUEST_INVALID, GUEST_TOO_LARGE, GUEST_IMPORT,
 * GUEST_START_SECTION, GUEST_NO_START, GUEST_MEMORY, GUEST_FEATURE, GUEST_SEGMENT, GUEST_FRAME, GUEST_EXPORT.
 * Synchronous and CPU-bound (seconds for a large guest); `loadGuest` caches the result.
 */
export function instrumentGuest(original: Uint8Array, opts: { storeLog?: boolean } = {}): InstrumentedGuest {
  const storeLog = opts.storeLog ?? false;
  const parsed = checkGuest(original);
  const prepared = memoryToImport(original, parsed, memoryImport.module, memoryImport.name, importedMemoryMaximumPages);
  const blocking = parsed.wasiImports.filter((n) => blockingWasiImports.includes(n));

  const wasm = withBinaryenSettings(() => {
    // binaryen.js's readBinary takes the features as a second argument (the typings lack it).
    const read = (bytes: Uint8Array) => (binaryen.readBinary as (data: Uint8Array, features: number) => binaryen.Module)(bytes, guestFeatures);
    let m: binaryen.Module;
    try {
      m = read(prepared);
    } catch {
      // V8 accepted the module: a custom section binaryen cannot parse (a stale name section)
      // is no reason to refuse it. Without them, guest traps name no functions.
      try {
        m = read(withoutCustomSections(prepared));
      } catch (err) {
        throw new GuestLoadError('GUEST_INVALID', `binaryen cannot read the guest module: ${errorMessage(err)}`);
      }
    }
    try {
      m.setFeatures(guestFeatures);
      if (m.getFunction('asyncify_start_unwind') !== 0 || m.getGlobal('__asyncify_state') !== 0) {
        throw new GuestLoadError('GUEST_EXPORT', 'guest module is already asyncified; give colo-vm the original module');
      }
      const defined: number[] = [];
      for (let i = 0; i < m.getNumFunctions(); i++) {
        const f = m.getFunctionByIndex(i);
        if (binaryen.getFunctionInfo(f).module === '') defined.push(f);
      }
      const memoryName = memoryInternalName(m);
      const budget = freshName(m, 'colo$budget');
      m.addGlobal(budget, binaryen.i32, true, m.i32.const(limits.preemptBudget));
      const dirtylog = storeLog ? freshName(m, 'colo$dirtylog') : null;
      if (dirtylog !== null) m.addGlobal(dirtylog, binaryen.i32, true, m.i32.const(0));
      const pages = freshName(m, 'colo$pages');
      m.addGlobal(pages, binaryen.i32, true, m.i32.const(parsed.memory.initialPages));
      const preempt = freshName(m, 'colo$preempt');
      m.addFunctionImport(preempt, preemptImport.module, preemptImport.name, binaryen.none, binaryen.none);
      const grow = freshName(m, 'colo$grow');
      m.addFunctionImport(grow, growImport.module, growImport.name, binaryen.i32, binaryen.i32);

      instrumentFunctions(m, defined, {
        budgetGlobal: budget,
        budgetReset: limits.preemptBudget,
        preemptFunction: preempt,
        storeLog: dirtylog === null ? null : { logGlobal: dirtylog, pageShift: log2(limits.pageBytes) },
        memoryName,
        reserved: { pagesGlobal: pages, growFunction: grow },
        bulkBytesShift: log2(limits.preemptBulkBytesPerCount),
      });

      const asyncifyImports = [...blocking.map((n) => `${wasiModule}.${n}`), `${preemptImport.module}.${preemptImport.name}`];
      binaryen.setPassArgument('asyncify-imports', asyncifyImports.join(','));
      m.runPasses(['asyncify']);
      // Every move of asyncify's stack pointer is checked against the end of its buffer, so
      // that an unwind deeper than the buffer traps instead of writing over guest memory.
      const frames = boundAsyncifyStack(m, '__asyncify_data', memoryName);
      if (frames.frameBytesMax > limits.asyncifyFrameBytesMax) {
        throw new GuestLoadError(
          'GUEST_FRAME',
          `a function of the guest saves ${frames.frameBytesMax} bytes of locals when paused, more than limits.asyncifyFrameBytesMax (${limits.asyncifyFrameBytesMax} bytes)`,
        );
      }
      // Export the host-facing globals before optimising, so that they survive even when the
      // guest never reads them (a guest without stores does not use the dirty log).
      m.addGlobalExport(budget, 'colo$budget');
      m.addGlobalExport(pages, 'colo$pages');
      if (dirtylog !== null) m.addGlobalExport(dirtylog, 'colo$dirtylog');
      m.optimize();

      // Export every mutable global under an index-based name (after optimisation, which may
      // remove or reorder globals). The module imports no globals, so index i is global i.
      for (let i = 0; i < m.getNumGlobals(); i++) {
        const info = binaryen.getGlobalInfo(m.getGlobalByIndex(i));
        if (info.mutable && !info.module) m.addGlobalExport(info.name, `colo$g${i}`);
      }
      for (const name of asyncifyExports) {
        if (m.getExport(name) === 0) throw new Error(`asyncify did not export ${name}`);
      }
      if (!m.validate()) throw new Error('binaryen validation of the instrumented module failed (see stderr)');
      // Keep the function names (a "name" section) so that guest traps name the function.
      binaryen.setDebugInfo(true);
      return m.emitBinary();
    } catch (err) {
      if (err instanceof GuestLoadError) throw err;
      throw new GuestLoadError('GUEST_INSTRUMENT', `instrumenting the guest module failed: ${errorMessage(err)}`, { cause: err });
    } finally {
      m.dispose();
    }
  });

  checkOutput(wasm, parsed);
  const globals = instrumentedGlobals(wasm, storeLog);
  return {
    wasm,
    moduleHash: sha256(original),
    instrumentVersion,
    memory: { initialPages: parsed.memory.initialPages, maximumPages: parsed.memory.maximumPages },
    globals,
    wasiImports: parsed.wasiImports,
    dataSegments: parsed.dataSegments,
    storeLog,
  };
}

/** The internal name binaryen gave the (only, imported) memory, found through its `memory` export. */
function memoryInternalName(m: binaryen.Module): string {
  const exp = m.getExport('memory');
  if (exp === 0) throw new Error('the prepared module does not export its memory as "memory"');
  const info = binaryen.getExportInfo(exp);
  if (info.kind !== binaryen.ExternalMemory) throw new Error('"memory" export is not a memory');
  return info.value;
}
