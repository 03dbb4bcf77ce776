/**
 * Guest instrumentation: turns a WASI preview1 command module into one that colo-vm can
 * pause anywhere, snapshot, resume in another process, migrate and replicate.
 *
 * The instrumented module
 * - imports its memory as `env.memory` (shared, initial = the original's initial pages,
 *   maximum 65536 pages) and also exports it as `memory`;
 * - counts loop iterations and function entries in the exported i32 global `colo$budget`
 *   and calls the import `colo.preempt: () -> ()` when the budget drops below 0 (it is then
 *   reset to `limits.preemptBudget`, so preempt comes every preemptBudget + 1 counts); the
 *   host may unwind there. Functions without loops and calls get no entry check (they run a
 *   bounded number of steps), and a guest with no check at all does not import colo.preempt;
 * - is asyncified (binaryen's `asyncify` pass) on `colo.preempt` and on the blocking WASI
 *   imports it uses (`blockingWasiImports`), and exports `asyncify_start_unwind(p)`,
 *   `asyncify_stop_unwind()`, `asyncify_start_rewind(p)`, `asyncify_stop_rewind()` and
 *   `asyncify_get_state()`;
 * - exports every mutable global as `colo$g<index>` (the budget also as `colo$budget`, the
 *   dirty log base also as `colo$dirtylog`, the guest's size in pages also as `colo$pages`);
 * - optionally (storeLog) marks in a byte map at `colo$dirtylog` every 4 KiB page it writes;
 * - never sees colo's region, the pages right above its own that hold the asyncify stack and
 *   the dirty log (reserved-region.ts): `memory.size` returns the global `colo$pages` (the
 *   guest's size, initially its initial pages), and `memory.grow` calls the import
 *   `colo.grow: (i32) -> i32`, which moves the region up past the new pages;
 *
 * `loadGuest` adds an on-disk cache because asyncify plus optimisation takes seconds; the
 * building itself (`instrumentGuest`, binaryen) is in instrument-build.ts, loaded only on a
 * cache miss.
 */
import { createHash, randomBytes } from 'node:crypto';
import { isDeepStrictEqual } from 'node:util';
import { constants as fsConstants } from 'node:fs';
import { mkdir, open, readFile, rename, stat, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { GuestLoadError, errorMessage } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { logger } from '../core/log.js';
import {
  coveredRanges,
  exportedMutableGlobals,
  parseGuest,
  readActiveDataSegments,
  readImports,
  readSections,
  wasiModule,
  type ParsedGuest,
} from './instrument-binary.js';

/** One mutable global of the instrumented module, as the host copies it into a snapshot. */
export interface GuestGlobal {
  /** Index in the instrumented module's global index space (it imports no globals). */
  index: number;
  /** Name under which the instrumented module exports the global. */
  exportName: string;
  type: 'i32' | 'i64' | 'f32' | 'f64';
}

/** The result of instrumenting a guest module, and what the host must know about it. */
export interface InstrumentedGuest {
  /** The instrumented module. */
  wasm: Uint8Array;
  /** sha256 (hex) of the ORIGINAL module bytes: the identity of the guest. */
  moduleHash: string;
  /** Version of the instrumentation (part of the cache key). */
  instrumentVersion: number;
  /** Memory limits of the ORIGINAL module, in 64 KiB wasm pages. */
  memory: { initialPages: number; maximumPages: number | null };
  /** Every mutable, non-imported global of the instrumented module, with its export name. */
  globals: GuestGlobal[];
  /** The wasi_snapshot_preview1 functions the guest imports. */
  wasiImports: string[];
  /** Active data segments of the original (constant offsets). */
  dataSegments: { offset: number; size: number }[];
  /** Whether store instrumentation (the dirty log) was applied. */
  storeLog: boolean;
}

/** The WASI preview1 functions a guest may import. */
export const allowedWasiImports: readonly string[] = Object.freeze([
  'args_get', 'args_sizes_get', 'environ_get', 'environ_sizes_get', 'clock_time_get', 'clock_res_get',
  'random_get', 'fd_write', 'fd_read', 'fd_pread', 'fd_pwrite', 'fd_sync', 'fd_datasync',
  'fd_filestat_get', 'fd_fdstat_get', 'fd_fdstat_set_flags', 'fd_seek', 'fd_tell', 'fd_close',
  'fd_prestat_get', 'fd_prestat_dir_name', 'sock_accept', 'sock_recv', 'sock_send', 'sock_shutdown',
  'poll_oneoff', 'sched_yield', 'proc_exit',
]);

/**
 * The WASI functions asyncify instruments: the host may pause the guest inside them (unwind,
 * and on resume re-enter the import with asyncify state 2 = rewinding).
 */
export const blockingWasiImports: readonly string[] = Object.freeze([
  'poll_oneoff', 'sock_accept', 'sock_recv', 'fd_read', 'sched_yield',
  // A disk write that finds the host's filesystem full waits in the call (state io-error).
  'fd_write', 'fd_pwrite',
]);

/** Bump when the instrumented output changes; part of the cache key. */
export const instrumentVersion = 6;

/** Import module and name of the preemption hook. */
export const preemptImport = { module: 'colo', name: 'preempt' } as const;
/** The host's memory.grow (reserved-region.ts), `(i32) -> i32`; never unwinds. */
export const growImport = { module: 'colo', name: 'grow' } as const;
/** Import module and name of the guest memory. */
export const memoryImport = { module: 'env', name: 'memory' } as const;
/** Export names of the asyncify control functions. */
export const asyncifyExports = Object.freeze([
  'asyncify_start_unwind', 'asyncify_stop_unwind', 'asyncify_start_rewind', 'asyncify_stop_rewind', 'asyncify_get_state',
] as const);
/** Maximum pages of the imported memory. */
export const importedMemoryMaximumPages = 65536;

export function sha256(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

export function log2(n: number): number {
  const s = Math.log2(n);
  if (!Number.isInteger(s)) throw new Error(`limits.pageBytes ${n} is not a power of two`);
  return s;
}

/** Validates with V8 and returns its error message, or null when the module is valid. */
function v8Problem(bytes: Uint8Array): string | null {
  if (WebAssembly.validate(bytes)) return null;
  try {
    new WebAssembly.Module(bytes);
    return 'WebAssembly.validate rejected it';
  } catch (err) {
    return errorMessage(err);
  }
}

/** Checks a guest module without instrumenting it (every GuestLoadError instrumentGuest can throw for bad input). */
export function checkGuest(original: Uint8Array): ParsedGuest {
  if (!(original instanceof Uint8Array)) {
    throw new GuestLoadError('GUEST_INVALID', 'guest module must be given as bytes (a Uint8Array)');
  }
  if (original.length > limits.guestModuleBytesMax) {
    throw new GuestLoadError(
      'GUEST_TOO_LARGE',
      `guest module is ${original.length} bytes, larger than limits.guestModuleBytesMax (${limits.guestModuleBytesMax} bytes)`,
    );
  }
  readSections(original); // magic and version first: the clearest message for a non-wasm file
  const problem = v8Problem(original);
  if (problem !== null) {
    // V8 11.3 has memory64 and multi-memory behind flags and calls such a module invalid,
    // with advice to enable the flag: name the proposal colo-vm does not support instead.
    try {
      parseGuest(original, allowedWasiImports);
    } catch (err) {
      if (err instanceof GuestLoadError && (err.code === 'GUEST_FEATURE' || err.code === 'GUEST_MEMORY')) throw err;
    }
    throw new GuestLoadError('GUEST_INVALID', `guest module is not valid WebAssembly: ${problem}`);
  }
  return parseGuest(original, allowedWasiImports);
}

/** The mutable globals of an instrumented module as the host sees them (read from the binary). */
export function instrumentedGlobals(wasm: Uint8Array, storeLog: boolean): GuestGlobal[] {
  let globals: GuestGlobal[];
  try {
    globals = exportedMutableGlobals(wasm);
  } catch (err) {
    throw new GuestLoadError('GUEST_INSTRUMENT', `instrumented module: ${errorMessage(err)}`);
  }
  if (!globals.some((g) => g.exportName === 'colo$budget')) {
    throw new GuestLoadError('GUEST_INSTRUMENT', 'instrumented module does not export colo$budget');
  }
  if (storeLog !== globals.some((g) => g.exportName === 'colo$dirtylog')) {
    throw new GuestLoadError('GUEST_INSTRUMENT', `instrumented module ${storeLog ? 'lacks' : 'has'} colo$dirtylog`);
  }
  return globals;
}

/** Checks the instrumented module against what the host expects to link. */
export function checkOutput(wasm: Uint8Array, parsed: ParsedGuest): void {
  const problem = v8Problem(wasm);
  if (problem !== null) throw new GuestLoadError('GUEST_INSTRUMENT', `the instrumented module does not validate in V8: ${problem}`);
  for (const imp of readImports(wasm)) {
    if (imp.kind === 2) {
      if (imp.module !== memoryImport.module || imp.name !== memoryImport.name || !imp.shared || imp.max !== importedMemoryMaximumPages) {
        throw new GuestLoadError('GUEST_INSTRUMENT', `instrumented module imports an unexpected memory ${imp.module}.${imp.name}`);
      }
    } else if (
      !(imp.module === preemptImport.module && imp.name === preemptImport.name) &&
      !(imp.module === growImport.module && imp.name === growImport.name) &&
      !(imp.module === wasiModule && parsed.wasiImports.includes(imp.name))
    ) {
      throw new GuestLoadError('GUEST_INSTRUMENT', `instrumented module imports an unexpected ${imp.module}.${imp.name}`);
    }
  }
  // Instantiation writes the active data segments into the (imported) memory; the host
  // restores those ranges after instantiating on a memory that already holds guest state,
  // using `dataSegments` of the original, so the instrumented module must write exactly them.
  const before = JSON.stringify(coveredRanges(parsed.dataSegments));
  const after = JSON.stringify(coveredRanges(readActiveDataSegments(wasm)));
  if (before !== after) {
    throw new GuestLoadError('GUEST_INSTRUMENT', `instrumented module initialises other memory ranges than the original (${after} instead of ${before})`);
  }
}

interface CacheMeta {
  format: 1;
  moduleHash: string;
  instrumentVersion: number;
  storeLog: boolean;
  wasmSha256: string;
  wasmBytes: number;
  memory: InstrumentedGuest['memory'];
  globals: GuestGlobal[];
  wasiImports: string[];
  dataSegments: InstrumentedGuest['dataSegments'];
}

function cacheKey(moduleHash: string, storeLog: boolean): string {
  return `${moduleHash}-${instrumentVersion}-${storeLog ? 1 : 0}`;
}

function isMeta(x: unknown, moduleHash: string, storeLog: boolean): x is CacheMeta {
  if (typeof x !== 'object' || x === null) return false;
  const o = x as Record<string, unknown>;
  const mem = o['memory'] as Record<string, unknown> | undefined;
  return (
    o['format'] === 1 &&
    o['moduleHash'] === moduleHash &&
    o['instrumentVersion'] === instrumentVersion &&
    o['storeLog'] === storeLog &&
    typeof o['wasmSha256'] === 'string' &&
    typeof o['wasmBytes'] === 'number' &&
    typeof mem === 'object' && mem !== null &&
    typeof mem['initialPages'] === 'number' &&
    (mem['maximumPages'] === null || typeof mem['maximumPages'] === 'number') &&
    Array.isArray(o['globals']) &&
    (o['globals'] as unknown[]).every((g) => {
      const r = g as Record<string, unknown>;
      return typeof g === 'object' && g !== null && typeof r['index'] === 'number' && typeof r['exportName'] === 'string' &&
        typeof r['type'] === 'string' && ['i32', 'i64', 'f32', 'f64'].includes(r['type'] as string);
    }) &&
    Array.isArray(o['wasiImports']) && (o['wasiImports'] as unknown[]).every((n) => typeof n === 'string') &&
    Array.isArray(o['dataSegments']) &&
    (o['dataSegments'] as unknown[]).every((d) => {
      const r = d as Record<string, unknown>;
      return typeof d === 'object' && d !== null && typeof r['offset'] === 'number' && typeof r['size'] === 'number';
    })
  );
}

/**
 * Reads a cache entry; null when absent, unreadable or not trustworthy: the metadata must
 * name this guest, version and storeLog, the wasm must have the recorded hash and validate,
 * the memory/imports/segments must be those of the original, and the globals those the wasm
 * really exports.
 */
async function readCacheEntry(dir: string, moduleHash: string, storeLog: boolean, parsed: ParsedGuest): Promise<InstrumentedGuest | null> {
  const key = cacheKey(moduleHash, storeLog);
  let wasm: Uint8Array;
  let meta: unknown;
  try {
    const w = await readOwnFile(join(dir, `${key}.wasm`), limits.guestModuleBytesMax * 4);
    const j = w === null ? null : await readOwnFile(join(dir, `${key}.json`), limits.guestModuleBytesMax);
    if (w === null || j === null) return null;
    wasm = new Uint8Array(w);
    meta = JSON.parse(j.toString('utf8'));
  } catch {
    return null;
  }
  if (!isMeta(meta, moduleHash, storeLog)) return null;
  if (wasm.length !== meta.wasmBytes || sha256(wasm) !== meta.wasmSha256 || !WebAssembly.validate(wasm)) return null;
  if (!isDeepStrictEqual(meta.memory, { initialPages: parsed.memory.initialPages, maximumPages: parsed.memory.maximumPages })) return null;
  if (!isDeepStrictEqual(meta.wasiImports, parsed.wasiImports) || !isDeepStrictEqual(meta.dataSegments, parsed.dataSegments)) return null;
  try {
    if (!isDeepStrictEqual(meta.globals, instrumentedGlobals(wasm, storeLog))) return null;
  } catch {
    return null;
  }
  return {
    wasm,
    moduleHash,
    instrumentVersion,
    memory: { initialPages: meta.memory.initialPages, maximumPages: meta.memory.maximumPages },
    globals: meta.globals.map((g) => ({ index: g.index, exportName: g.exportName, type: g.type })),
    wasiImports: [...meta.wasiImports],
    dataSegments: meta.dataSegments.map((d) => ({ offset: d.offset, size: d.size })),
    storeLog,
  };
}

/**
 * A cache file's bytes, or null unless it is a regular file (not a FIFO, device or symlink:
 * a read of those could block or never end) of at most `maxBytes`, owned by this process's
 * user and writable by nobody else. The hash in the metadata proves nothing about who wrote
 * both files: an entry another user planted in a shared cache folder would run as the guest.
 */
async function readOwnFile(path: string, maxBytes: number): Promise<Buffer | null> {
  let fh;
  try {
    fh = await open(path, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK);
  } catch {
    return null;
  }
  try {
    const st = await fh.stat();
    const uid = process.getuid?.();
    if (!st.isFile() || st.size > maxBytes || (uid !== undefined && st.uid !== uid) || (st.mode & 0o022) !== 0) return null;
    const data = await fh.readFile();
    return data.byteLength > maxBytes ? null : data;
  } catch {
    return null;
  } finally {
    await fh.close().catch(() => undefined);
  }
}

/** Writes `data` to `path` atomically (temporary file in the same directory, then rename). */
async function writeAtomic(path: string, data: Uint8Array | string): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`;
  try {
    // 0644 whatever the umask (a umask of 002 made entries group-writable: never trusted).
    await writeFile(tmp, data, { mode: 0o644, flag: 'wx' });
    await rename(tmp, path);
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
}

/** Writes a cache entry; returns false when the directory is not usable. */
async function writeCacheEntry(dir: string, g: InstrumentedGuest): Promise<boolean> {
  const key = cacheKey(g.moduleHash, g.storeLog);
  const meta: CacheMeta = {
    format: 1,
    moduleHash: g.moduleHash,
    instrumentVersion: g.instrumentVersion,
    storeLog: g.storeLog,
    wasmSha256: sha256(g.wasm),
    wasmBytes: g.wasm.length,
    memory: g.memory,
    globals: g.globals,
    wasiImports: g.wasiImports,
    dataSegments: g.dataSegments,
  };
  try {
    await mkdir(dir, { recursive: true });
    // The wasm first: the metadata names the wasm's hash, so a crash between the two renames
    // leaves an entry that fails the check and is rebuilt.
    await writeAtomic(join(dir, `${key}.wasm`), g.wasm);
    await writeAtomic(join(dir, `${key}.json`), JSON.stringify(meta, null, 1) + '\n');
    return true;
  } catch {
    return false;
  }
}

/** The cache directories to try, in order. */
export function cacheDirs(guestPath: string, cacheDir?: string): string[] {
  const fallback = join(tmpdir(), 'colo-cache');
  const first = cacheDir ?? join(dirname(guestPath), '.colo-cache');
  return first === fallback ? [first] : [first, fallback];
}

/**
 * Reads a guest module from `path` and returns it instrumented, from the cache when an
 * intact entry `<moduleHash>-<instrumentVersion>-<storeLog?1:0>.wasm` (+ `.json`) exists in
 * `opts.cacheDir` (default: `.colo-cache/` next to the guest file; `os.tmpdir()/colo-cache`
 * when that is not writable). A missing or corrupt entry (metadata mismatch, wasm hash
 * mismatch, or a module that fails WebAssembly.validate) is rebuilt and rewritten atomically.
 */
export async function loadGuest(path: string, opts: { storeLog?: boolean; cacheDir?: string } = {}): Promise<InstrumentedGuest> {
  const storeLog = opts.storeLog ?? false;
  let size: number;
  try {
    size = (await stat(path)).size;
  } catch (err) {
    throw new GuestLoadError('GUEST_NOT_FOUND', `cannot read guest module ${path}: ${errorMessage(err)}`);
  }
  if (size > limits.guestModuleBytesMax) {
    throw new GuestLoadError(
      'GUEST_TOO_LARGE',
      `guest module ${path} is ${size} bytes, larger than limits.guestModuleBytesMax (${limits.guestModuleBytesMax} bytes)`,
    );
  }
  let original: Uint8Array;
  try {
    original = new Uint8Array(await readFile(path));
  } catch (err) {
    throw new GuestLoadError('GUEST_NOT_FOUND', `cannot read guest module ${path}: ${errorMessage(err)}`);
  }
  const moduleHash = sha256(original);
  const parsed = checkGuest(original);
  const dirs = cacheDirs(path, opts.cacheDir);
  for (const dir of dirs) {
    const hit = await readCacheEntry(dir, moduleHash, storeLog, parsed);
    if (hit !== null) return hit;
  }
  // Seconds (a minute on a loaded host) in which the process answers no signal: say why.
  logger('guest').debug(`instrumenting ${path} (not in the cache ${dirs.join(' or ')})`);
  // binaryen (about 0.5 s to load, its memory kept for good) is loaded only to build.
  const { instrumentGuest } = await import('./instrument-build.js');
  const g = instrumentGuest(original, { storeLog });
  for (const dir of dirs) {
    if (await writeCacheEntry(dir, g)) break;
  }
  return g;
}
