/**
 * A small reader for the WebAssembly binary format, used by the guest instrumentation to
 * check a guest module before binaryen sees it (binaryen reports problems on stderr and
 * aborts; we want a GuestLoadError that names the import, section or feature instead), to
 * learn the facts the host needs (memory limits, data segments, WASI imports), and to turn
 * the guest's own memory into the shared `env.memory` import.
 *
 * Only what a WASI preview1 guest of colo-vm may contain is decoded in full; the first
 * instruction or type of any other proposal stops the scan with a GUEST_FEATURE error that
 * names the proposal.
 */
import { GuestLoadError } from '../core/errors.js';
import { concatBytes } from '../core/bytes.js';
import { limits } from '../core/limits.js';

/** The import module of every function a guest may import. */
export const wasiModule = 'wasi_snapshot_preview1';

type ValType = 'i32' | 'i64' | 'f32' | 'f64';

/** WASI preview1 function signatures as wasi-libc imports them (params, results). */
export const wasiSignatures: Readonly<Record<string, readonly [readonly ValType[], readonly ValType[]]>> = {
  args_get: [['i32', 'i32'], ['i32']],
  args_sizes_get: [['i32', 'i32'], ['i32']],
  environ_get: [['i32', 'i32'], ['i32']],
  environ_sizes_get: [['i32', 'i32'], ['i32']],
  clock_time_get: [['i32', 'i64', 'i32'], ['i32']],
  clock_res_get: [['i32', 'i32'], ['i32']],
  random_get: [['i32', 'i32'], ['i32']],
  fd_write: [['i32', 'i32', 'i32', 'i32'], ['i32']],
  fd_read: [['i32', 'i32', 'i32', 'i32'], ['i32']],
  fd_pread: [['i32', 'i32', 'i32', 'i64', 'i32'], ['i32']],
  fd_pwrite: [['i32', 'i32', 'i32', 'i64', 'i32'], ['i32']],
  fd_sync: [['i32'], ['i32']],
  fd_datasync: [['i32'], ['i32']],
  fd_filestat_get: [['i32', 'i32'], ['i32']],
  fd_fdstat_get: [['i32', 'i32'], ['i32']],
  fd_fdstat_set_flags: [['i32', 'i32'], ['i32']],
  fd_seek: [['i32', 'i64', 'i32', 'i32'], ['i32']],
  fd_tell: [['i32', 'i32'], ['i32']],
  fd_close: [['i32'], ['i32']],
  fd_prestat_get: [['i32', 'i32'], ['i32']],
  fd_prestat_dir_name: [['i32', 'i32', 'i32'], ['i32']],
  sock_accept: [['i32', 'i32', 'i32'], ['i32']],
  sock_recv: [['i32', 'i32', 'i32', 'i32', 'i32', 'i32'], ['i32']],
  sock_send: [['i32', 'i32', 'i32', 'i32', 'i32'], ['i32']],
  sock_shutdown: [['i32', 'i32'], ['i32']],
  poll_oneoff: [['i32', 'i32', 'i32', 'i32'], ['i32']],
  sched_yield: [[], ['i32']],
  proc_exit: [['i32'], []],
};

/** One import of the guest. `kind` is the wasm external kind. */
export interface ParsedImport {
  module: string;
  name: string;
  kind: 'function' | 'table' | 'memory' | 'global' | 'tag';
}

/** The facts about a guest module that instrumentation and the host need. */
export interface ParsedGuest {
  imports: ParsedImport[];
  /** Names of the WASI functions imported, in import order, without duplicates. */
  wasiImports: string[];
  memory: { initialPages: number; maximumPages: number | null; shared: boolean };
  dataSegments: { offset: number; size: number }[];
  exports: { name: string; kind: number; index: number }[];
  /** The section list of the original, for rewriting. */
  sections: Section[];
}

/** A top-level section: its id and where its payload lies in the module bytes. */
export interface Section {
  id: number;
  /** Offset of the section id byte. */
  headerStart: number;
  /** Offset of the first payload byte. */
  start: number;
  /** Offset just past the payload. */
  end: number;
}

const sectionNames: Record<number, string> = {
  0: 'custom', 1: 'type', 2: 'import', 3: 'function', 4: 'table', 5: 'memory', 6: 'global',
  7: 'export', 8: 'start', 9: 'element', 10: 'code', 11: 'data', 12: 'data count', 13: 'tag',
};

function invalid(message: string): GuestLoadError {
  return new GuestLoadError('GUEST_INVALID', `guest module is not valid WebAssembly: ${message}`);
}

function feature(what: string, where: string): GuestLoadError {
  return new GuestLoadError(
    'GUEST_FEATURE',
    `guest module uses ${what} (${where}), which colo-vm does not support; build the guest for ` +
      'plain wasm32-wasi (MVP plus mutable-globals, sign-ext, bulk-memory, nontrapping-fptoint, atomics), ' +
      'e.g. without -msimd128, -mreference-types, -mmultivalue, -mtail-call or -fwasm-exceptions',
  );
}

/**
 * memory.atomic.wait traps on a memory that is not shared (a single-threaded wasm32-wasi
 * guest's), but colo-vm always gives the guest a shared memory: there the wait would block the
 * vCPU thread, with no other guest thread to wake it, and the machine could no longer be
 * paused. (memory.atomic.notify is harmless: with no waiter it returns 0.)
 */
function atomicWait(instruction: string, where: string): GuestLoadError {
  return new GuestLoadError(
    'GUEST_FEATURE',
    `guest module uses ${instruction} (${where}), which colo-vm does not support: the guest's memory is shared under ` +
      'colo-vm, so the wait would block the vCPU for good (in the original unshared memory it traps); build the guest without threads',
  );
}

/** A cursor over a byte range that throws GUEST_INVALID when it runs past its end. */
export class ByteReader {
  pos: number;
  constructor(readonly bytes: Uint8Array, start: number, readonly end: number) {
    this.pos = start;
  }
  get done(): boolean {
    return this.pos >= this.end;
  }
  u8(): number {
    if (this.pos >= this.end) throw invalid(`unexpected end at byte ${this.pos}`);
    return this.bytes[this.pos++]!;
  }
  /** Unsigned LEB128 of at most 32 bits. */
  u32(): number {
    let result = 0;
    let shift = 0;
    for (;;) {
      const b = this.u8();
      if (shift === 28 && (b & 0x70) !== 0) throw invalid(`LEB128 too large at byte ${this.pos - 1}`);
      result += (b & 0x7f) * 2 ** shift;
      if ((b & 0x80) === 0) return result;
      shift += 7;
      if (shift > 28) throw invalid(`LEB128 too long at byte ${this.pos}`);
    }
  }
  /** Signed LEB128 of at most `bits` bits, returned as a number (exact up to 2^53). */
  sleb(bits: number): number {
    let result = 0;
    let shift = 0;
    let b: number;
    const maxBytes = Math.ceil(bits / 7);
    let n = 0;
    do {
      b = this.u8();
      if (++n > maxBytes) throw invalid(`signed LEB128 too long at byte ${this.pos}`);
      result += (b & 0x7f) * 2 ** shift;
      shift += 7;
    } while (b & 0x80);
    if (b & 0x40) result -= 2 ** shift;
    return result;
  }
  skip(n: number): void {
    if (n < 0 || this.pos + n > this.end) throw invalid(`unexpected end at byte ${this.pos}`);
    this.pos += n;
  }
  name(): string {
    const len = this.u32();
    const start = this.pos;
    this.skip(len);
    return new TextDecoder('utf-8', { fatal: false }).decode(this.bytes.subarray(start, start + len));
  }
}

/** Splits a module into its sections (after checking magic and version). */
export function readSections(bytes: Uint8Array): Section[] {
  if (bytes.length < 8 || bytes[0] !== 0x00 || bytes[1] !== 0x61 || bytes[2] !== 0x73 || bytes[3] !== 0x6d) {
    throw new GuestLoadError('GUEST_INVALID', 'guest file is not a WebAssembly module (it does not start with "\\0asm")');
  }
  if (bytes[4] !== 1 || bytes[5] !== 0 || bytes[6] !== 0 || bytes[7] !== 0) {
    throw new GuestLoadError(
      'GUEST_INVALID',
      'guest module is not a WebAssembly core module of version 1 (a component or an unknown version)',
    );
  }
  const r = new ByteReader(bytes, 8, bytes.length);
  const sections: Section[] = [];
  while (!r.done) {
    const headerStart = r.pos;
    const id = r.u8();
    const size = r.u32();
    const start = r.pos;
    r.skip(size);
    sections.push({ id, headerStart, start, end: start + size });
  }
  return sections;
}

interface FuncType {
  params: ValType[];
  results: ValType[];
}

function valType(b: number, where: string): ValType {
  switch (b) {
    case 0x7f: return 'i32';
    case 0x7e: return 'i64';
    case 0x7d: return 'f32';
    case 0x7c: return 'f64';
    case 0x7b: throw feature('SIMD (v128 values)', where);
    case 0x70: case 0x6f: throw feature('reference types (funcref/externref values)', where);
    default: throw feature(`a value type of a post-MVP proposal (0x${b.toString(16)}; GC or typed references)`, where);
  }
}

function formatSig(t: FuncType | readonly [readonly ValType[], readonly ValType[]]): string {
  const [p, r] = Array.isArray(t) ? t : [(t as FuncType).params, (t as FuncType).results];
  const results = r.length === 0 ? '()' : r.length === 1 ? r[0] : `(${r.join(', ')})`;
  return `(${p.join(', ')}) -> ${results}`;
}

function readLimits(r: ByteReader, what: string): { min: number; max: number | null; shared: boolean } {
  const flags = r.u8();
  if (flags & ~0x03) {
    if (flags & 0x04) throw feature('64-bit memories or tables (memory64)', what);
    throw feature(`limits flags 0x${flags.toString(16)}`, what);
  }
  const min = r.u32();
  const max = flags & 0x01 ? r.u32() : null;
  return { min, max, shared: (flags & 0x02) !== 0 };
}

/** Reads a constant expression and returns its i32 value when it is `i32.const`, else null. */
function constExpr(r: ByteReader, where: string): number | null {
  const op = r.u8();
  let value: number | null = null;
  switch (op) {
    case 0x41: value = r.sleb(32); break;
    case 0x42: r.sleb(64); break;
    case 0x43: r.skip(4); break;
    case 0x44: r.skip(8); break;
    case 0x23: r.u32(); break;
    case 0xd0: case 0xd2: throw feature('reference types', where);
    default: throw feature(`a non-constant initializer (opcode 0x${op.toString(16)}; extended-const)`, where);
  }
  const end = r.u8();
  if (end !== 0x0b) throw feature(`an extended constant expression (opcode 0x${end.toString(16)})`, where);
  return value;
}

/**
 * Parses and checks a guest module: the import allow-list and WASI signatures, the start
 * section, exactly one memory, an exported `_start: () -> ()`, and the features used by
 * every type, global, segment and function body. `allowed` is the WASI allow-list.
 */
export function parseGuest(bytes: Uint8Array, allowed: readonly string[]): ParsedGuest {
  const sections = readSections(bytes);
  const types: FuncType[] = [];
  const imports: ParsedImport[] = [];
  const funcTypes: number[] = []; // type index of every function (imports first)
  const memories: { min: number; max: number | null; shared: boolean }[] = [];
  const exports: { name: string; kind: number; index: number }[] = [];
  const dataSegments: { offset: number; size: number }[] = [];
  let importedFuncs = 0;
  let tables = 0;
  let tableMin = 0;

  for (const s of sections) {
    const r = new ByteReader(bytes, s.start, s.end);
    const secName = sectionNames[s.id] ?? `unknown section ${s.id}`;
    switch (s.id) {
      case 0:
        break;
      case 1: {
        const n = r.u32();
        for (let i = 0; i < n; i++) {
          const where = `type ${i}`;
          const form = r.u8();
          if (form !== 0x60) throw feature('GC type definitions (struct/array/rec types)', where);
          const np = r.u32();
          const params: ValType[] = [];
          for (let j = 0; j < np; j++) params.push(valType(r.u8(), where));
          const nr = r.u32();
          const results: ValType[] = [];
          for (let j = 0; j < nr; j++) results.push(valType(r.u8(), where));
          if (results.length > 1) throw feature('multi-value (a function returning several values)', where);
          types.push({ params, results });
        }
        break;
      }
      case 2: {
        const n = r.u32();
        for (let i = 0; i < n; i++) {
          const module = r.name();
          const name = r.name();
          const k = r.u8();
          const full = `${module}.${name}`;
          const kinds = ['function', 'table', 'memory', 'global', 'tag'] as const;
          const kind = kinds[k];
          if (kind === undefined) throw invalid(`import ${full} has unknown kind ${k}`);
          imports.push({ module, name, kind });
          if (kind !== 'function') {
            const hint =
              kind === 'memory'
                ? '; the guest must define its own memory (link without --import-memory)'
                : kind === 'table'
                  ? '; the guest must define its own table (link without --import-table)'
                  : '';
            throw new GuestLoadError(
              'GUEST_IMPORT',
              `guest imports ${kind} ${full}, but a colo-vm guest may import only wasi_snapshot_preview1 functions${hint}`,
            );
          }
          const typeIndex = r.u32();
          if (module !== wasiModule || !allowed.includes(name)) {
            throw new GuestLoadError(
              'GUEST_IMPORT',
              `guest imports ${full}, which colo-vm does not provide; a guest may import only these ` +
                `${wasiModule} functions: ${allowed.join(', ')}`,
            );
          }
          const t = types[typeIndex];
          const want = wasiSignatures[name]!;
          if (
            t === undefined ||
            t.params.join() !== want[0].join() ||
            t.results.join() !== want[1].join()
          ) {
            throw new GuestLoadError(
              'GUEST_IMPORT',
              `guest imports ${full} with type ${t ? formatSig(t) : `#${typeIndex}`}, but WASI preview1 defines it as ${formatSig(want)}`,
            );
          }
          funcTypes.push(typeIndex);
          importedFuncs++;
        }
        break;
      }
      case 3: {
        const n = r.u32();
        for (let i = 0; i < n; i++) funcTypes.push(r.u32());
        break;
      }
      case 4: {
        const n = r.u32();
        for (let i = 0; i < n; i++) {
          const et = r.u8();
          if (et !== 0x70) throw feature('reference types (a table of externref or typed references)', `table ${i}`);
          tableMin = readLimits(r, `table ${i}`).min;
          tables++;
        }
        if (tables > 1) throw feature('reference types (more than one table)', 'table section');
        break;
      }
      case 5: {
        const n = r.u32();
        for (let i = 0; i < n; i++) memories.push(readLimits(r, `memory ${i}`));
        break;
      }
      case 6: {
        const n = r.u32();
        for (let i = 0; i < n; i++) {
          valType(r.u8(), `global ${i}`);
          r.u8();
          constExpr(r, `initializer of global ${i}`);
        }
        break;
      }
      case 7: {
        const n = r.u32();
        for (let i = 0; i < n; i++) {
          const name = r.name();
          const kind = r.u8();
          const index = r.u32();
          exports.push({ name, kind, index });
        }
        break;
      }
      case 8:
        throw new GuestLoadError(
          'GUEST_START_SECTION',
          'guest module has a wasm start section (a function that runs during instantiation); colo-vm ' +
            'cannot pause or snapshot it: build the guest as a WASI command whose entry point is the ' +
            'exported `_start` function (clang --target=wasm32-wasi, no -Wl,--no-entry)',
        );
      case 9: {
        const n = r.u32();
        for (let i = 0; i < n; i++) {
          const where = `element segment ${i}`;
          const flags = r.u32();
          let offset: number | null = null;
          if (flags === 0) {
            offset = constExpr(r, where);
          } else if (flags === 1 || flags === 2) {
            if (flags === 2) {
              if (r.u32() !== 0) throw feature('reference types (a segment for a second table)', where);
              offset = constExpr(r, where);
            }
            if (r.u8() !== 0x00) throw feature('reference types (an element kind other than funcref)', where);
          } else {
            throw feature('reference types (declarative or expression element segments)', where);
          }
          const count = r.u32();
          for (let j = 0; j < count; j++) r.u32();
          if (offset !== null && (offset >>> 0) + count > tableMin) {
            throw new GuestLoadError(
              'GUEST_SEGMENT',
              `guest module's ${where} (${count} entries at ${offset >>> 0}) lies outside its table of ${tableMin} entries; instantiating it would fail`,
            );
          }
        }
        break;
      }
      case 10: {
        const n = r.u32();
        for (let i = 0; i < n; i++) {
          const size = r.u32();
          const body = new ByteReader(bytes, r.pos, r.pos + size);
          scanBody(body, types, `function ${importedFuncs + i}`);
          r.skip(size);
        }
        break;
      }
      case 11: {
        const n = r.u32();
        for (let i = 0; i < n; i++) {
          const where = `data segment ${i}`;
          const flags = r.u32();
          let offset: number | null = null;
          if (flags === 0 || flags === 2) {
            if (flags === 2 && r.u32() !== 0) throw feature('multi-memory', where);
            offset = constExpr(r, where);
            if (offset === null) throw feature('a data segment whose offset is not an i32 constant', where);
          } else if (flags !== 1) {
            throw invalid(`${where} has unknown flags ${flags}`);
          }
          const size = r.u32();
          r.skip(size);
          if (offset === null) continue;
          // At boot the host's reserved pages sit right after the initial ones (the top of memory):
          // a segment past the initial memory, which fails to instantiate in the original,
          // would land there and be overwritten (or overwrite colo's state) without an error.
          const memoryBytes = (memories[0]?.min ?? 0) * limits.wasmPageBytes;
          if ((offset >>> 0) + size > memoryBytes) {
            throw new GuestLoadError(
              'GUEST_SEGMENT',
              `guest module's ${where} ([${offset >>> 0}, ${(offset >>> 0) + size})) lies outside its initial memory of ${memoryBytes} bytes; instantiating it would fail`,
            );
          }
          dataSegments.push({ offset: offset >>> 0, size });
        }
        break;
      }
      case 12:
        r.u32();
        break;
      case 13:
        throw feature('exception handling (a tag section)', 'tag section');
      default:
        throw invalid(`unknown ${secName}`);
    }
  }

  if (memories.length === 0) {
    throw new GuestLoadError('GUEST_MEMORY', 'guest module defines no memory; a WASI guest needs exactly one (exported as "memory")');
  }
  if (memories.length > 1) {
    throw new GuestLoadError('GUEST_MEMORY', `guest module defines ${memories.length} memories; colo-vm supports exactly one`);
  }
  const start = exports.find((e) => e.name === '_start');
  if (start === undefined || start.kind !== 0) {
    throw new GuestLoadError(
      'GUEST_NO_START',
      'guest module does not export a `_start` function; build it as a WASI command (clang --target=wasm32-wasi with a main function)',
    );
  }
  const st = types[funcTypes[start.index] ?? -1];
  if (st === undefined || st.params.length !== 0 || st.results.length !== 0) {
    throw new GuestLoadError(
      'GUEST_NO_START',
      `guest module exports \`_start\` with type ${st ? formatSig(st) : '?'}; a WASI command's _start takes and returns nothing`,
    );
  }
  for (const e of exports) {
    if (e.name.startsWith('colo$') || e.name.startsWith('asyncify_')) {
      throw new GuestLoadError(
        'GUEST_EXPORT',
        `guest module exports "${e.name}", a name colo-vm reserves for its instrumentation (is the module already instrumented?)`,
      );
    }
  }
  const wasiImports: string[] = [];
  for (const i of imports) if (!wasiImports.includes(i.name)) wasiImports.push(i.name);
  const mem = memories[0]!;
  return {
    imports,
    wasiImports,
    memory: { initialPages: mem.min, maximumPages: mem.max, shared: mem.shared },
    dataSegments,
    exports,
    sections,
  };
}

function blockType(r: ByteReader, where: string): void {
  const b = r.bytes[r.pos];
  if (b === 0x40) {
    r.pos++;
    return;
  }
  if (b !== undefined && (b & 0xc0) === 0x40) {
    // A one-byte negative s33: a value type.
    r.pos++;
    valType(b, where);
    return;
  }
  r.sleb(33);
  throw feature('multi-value (a block with a type index)', where);
}

function memarg(r: ByteReader, where: string): void {
  const align = r.u32();
  if (align & 0x40) throw feature('multi-memory (a memory index in a load or store)', where);
  r.u32();
}

function memIndexZero(r: ByteReader, where: string): void {
  if (r.u8() !== 0) throw feature('multi-memory', where);
}

/**
 * Decodes one function body and checks that every instruction belongs to the supported
 * feature set. `where` names the function (wasm function index).
 */
function scanBody(r: ByteReader, types: FuncType[], where: string): void {
  const groups = r.u32();
  for (let i = 0; i < groups; i++) {
    r.u32();
    valType(r.u8(), `locals of ${where}`);
  }
  let depth = 1;
  while (depth > 0) {
    const at = `${where}, byte ${r.pos}`;
    const op = r.u8();
    if (op === 0x0b) {
      depth--;
      continue;
    }
    if (op === 0x02 || op === 0x03 || op === 0x04) {
      blockType(r, at);
      depth++;
      continue;
    }
    if (op >= 0x45 && op <= 0xc4) continue; // numeric, incl. sign-extension (0xc0-0xc4)
    if (op >= 0x28 && op <= 0x3e) {
      memarg(r, at);
      continue;
    }
    switch (op) {
      case 0x00: case 0x01: case 0x05: case 0x0f: case 0x1a: case 0x1b:
        break;
      case 0x0c: case 0x0d: case 0x10: case 0x20: case 0x21: case 0x22: case 0x23: case 0x24:
        r.u32();
        break;
      case 0x0e: {
        const n = r.u32();
        for (let j = 0; j <= n; j++) r.u32();
        break;
      }
      case 0x11: {
        const t = r.u32();
        if (types[t] === undefined) throw invalid(`call_indirect with unknown type ${t} in ${at}`);
        if (r.u32() !== 0) throw feature('reference types (call_indirect through a second table)', at);
        break;
      }
      case 0x3f: case 0x40:
        memIndexZero(r, at);
        break;
      case 0x41: r.sleb(32); break;
      case 0x42: r.sleb(64); break;
      case 0x43: r.skip(4); break;
      case 0x44: r.skip(8); break;
      case 0x06: case 0x07: case 0x08: case 0x09: case 0x0a: case 0x18: case 0x19: case 0x1f:
        throw feature('exception handling', at);
      case 0x12: case 0x13:
        throw feature('tail calls (return_call)', at);
      case 0x14: case 0x15: case 0xd3: case 0xd4: case 0xd5: case 0xd6:
        throw feature('typed function references', at);
      case 0x1c: case 0x25: case 0x26: case 0xd0: case 0xd1: case 0xd2:
        throw feature('reference types', at);
      case 0xfb:
        throw feature('garbage collection (GC) instructions', at);
      case 0xfd:
        throw feature('SIMD (v128 instructions)', at);
      case 0xfc: {
        const sub = r.u32();
        if (sub <= 7) break; // saturating float-to-int
        switch (sub) {
          case 8: r.u32(); memIndexZero(r, at); break; // memory.init
          case 9: r.u32(); break; // data.drop
          case 10: memIndexZero(r, at); memIndexZero(r, at); break; // memory.copy
          case 11: memIndexZero(r, at); break; // memory.fill
          case 12: case 13: case 14:
            throw feature('table.init/elem.drop/table.copy (they change the function table, which colo-vm does not snapshot)', at);
          default:
            throw feature(`0xfc ${sub} (reference types or a later proposal)`, at);
        }
        break;
      }
      case 0xfe: {
        const sub = r.u32();
        if (sub === 0x01 || sub === 0x02) throw atomicWait(sub === 0x01 ? 'memory.atomic.wait32' : 'memory.atomic.wait64', at);
        if (sub === 0x03) {
          if (r.u8() !== 0) throw invalid(`atomic.fence with a nonzero flag in ${at}`);
        } else if (sub <= 0x02 || (sub >= 0x10 && sub <= 0x4e)) {
          memarg(r, at);
        } else {
          throw feature(`atomic instruction 0xfe ${sub}`, at);
        }
        break;
      }
      default:
        throw feature(`opcode 0x${op.toString(16)}`, at);
    }
  }
  if (r.pos !== r.end) throw invalid(`${where} has bytes after its final end`);
}

function uleb(n: number): number[] {
  const out: number[] = [];
  do {
    let b = n & 0x7f;
    n = Math.floor(n / 128);
    if (n !== 0) b |= 0x80;
    out.push(b);
  } while (n !== 0);
  return out;
}

function nameBytes(s: string): number[] {
  const b = new TextEncoder().encode(s);
  return [...uleb(b.length), ...b];
}

function sectionBytes(id: number, payload: Uint8Array | number[]): Uint8Array {
  const p = payload instanceof Uint8Array ? payload : Uint8Array.from(payload);
  const head = Uint8Array.from([id, ...uleb(p.length)]);
  const out = new Uint8Array(head.length + p.length);
  out.set(head, 0);
  out.set(p, head.length);
  return out;
}

const sectionRank: Record<number, number> = { 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, 9: 9, 12: 10, 10: 11, 11: 12, 13: 5.5 };

/**
 * Returns a copy of the module whose memory is no longer defined but imported as
 * `module.name`, shared, with the original initial size and the given maximum, and which
 * exports that memory as `memory` (added when the original does not). The memory stays
 * memory 0 (a module has one memory), so data segments and instructions are unchanged, and
 * a memory import does not move function or global indices.
 */
export function memoryToImport(
  bytes: Uint8Array,
  parsed: ParsedGuest,
  module: string,
  name: string,
  maximumPages: number,
): Uint8Array {
  const importEntry = [
    ...nameBytes(module),
    ...nameBytes(name),
    0x02, // memory
    0x03, // has maximum, shared
    ...uleb(parsed.memory.initialPages),
    ...uleb(maximumPages),
  ];
  const clash = parsed.exports.find((e) => e.name === 'memory' && e.kind !== 2);
  if (clash !== undefined) {
    throw new GuestLoadError('GUEST_EXPORT', 'guest module exports something other than its memory under the name "memory"');
  }
  const exportEntry = parsed.exports.some((e) => e.name === 'memory') ? null : [...nameBytes('memory'), 0x02, 0x00];

  /** A vector section with `entry` appended (or a new one when `old` is null). */
  const withEntry = (id: number, old: Section | null, entry: number[]): Uint8Array => {
    if (old === null) return sectionBytes(id, [...uleb(1), ...entry]);
    const r = new ByteReader(bytes, old.start, old.end);
    const count = r.u32();
    return sectionBytes(id, [...uleb(count + 1), ...bytes.subarray(r.pos, old.end), ...entry]);
  };
  const pending = new Map<number, number[]>([[2, importEntry]]);
  if (exportEntry !== null) pending.set(7, exportEntry);

  const parts: Uint8Array[] = [bytes.subarray(0, 8)];
  const flushBefore = (rank: number) => {
    for (const [id, entry] of [...pending]) {
      if (sectionRank[id]! < rank) {
        parts.push(withEntry(id, null, entry));
        pending.delete(id);
      }
    }
  };
  for (const s of parsed.sections) {
    if (s.id !== 0) flushBefore(sectionRank[s.id] ?? 99);
    const entry = pending.get(s.id);
    if (entry !== undefined) {
      parts.push(withEntry(s.id, s, entry));
      pending.delete(s.id);
      continue;
    }
    if (s.id === 5) continue; // the memory section goes away
    parts.push(bytes.subarray(s.headerStart, s.end));
  }
  flushBefore(100);
  return concatBytes(parts);
}

/**
 * The module without its custom sections. They carry no semantics and are not validated (a
 * malformed name section is to be ignored, and V8 does); binaryen refuses to read some that
 * V8 accepts (a stale name section), so the build reads the module again without them.
 */
export function withoutCustomSections(bytes: Uint8Array): Uint8Array {
  const parts: Uint8Array[] = [bytes.subarray(0, 8)];
  for (const s of readSections(bytes)) if (s.id !== 0) parts.push(bytes.subarray(s.headerStart, s.end));
  return concatBytes(parts);
}

/** Reads the imports of an (instrumented) module: used to check the final output. */
export function readImports(bytes: Uint8Array): { module: string; name: string; kind: number; shared?: boolean; min?: number; max?: number | null }[] {
  const out: { module: string; name: string; kind: number; shared?: boolean; min?: number; max?: number | null }[] = [];
  for (const s of readSections(bytes)) {
    if (s.id !== 2) continue;
    const r = new ByteReader(bytes, s.start, s.end);
    const n = r.u32();
    for (let i = 0; i < n; i++) {
      const module = r.name();
      const name = r.name();
      const kind = r.u8();
      if (kind === 0) {
        r.u32();
        out.push({ module, name, kind });
      } else if (kind === 2) {
        const l = readLimits(r, `import ${module}.${name}`);
        out.push({ module, name, kind, shared: l.shared, min: l.min, max: l.max });
      } else {
        throw invalid(`unexpected import kind ${kind}`);
      }
    }
  }
  return out;
}

/** A mutable, non-imported global of an instrumented module and the name it is exported under. */
export interface ExportedGlobal {
  index: number;
  exportName: string;
  type: ValType;
}

/** Globals that are exported under their own name as well as `colo$g<index>`. */
export const namedGlobals: readonly string[] = ['colo$budget', 'colo$dirtylog', 'colo$pages'];

/**
 * Lists every mutable, non-imported global of an instrumented module with its export name:
 * one of `namedGlobals` for those, `colo$g<index>` for the others. Throws when
 * a mutable global is not exported under such a name.
 */
export function exportedMutableGlobals(bytes: Uint8Array): ExportedGlobal[] {
  let importedGlobals = 0;
  const globals: { type: ValType; mutable: boolean }[] = [];
  const exportsByIndex = new Map<number, string[]>();
  for (const s of readSections(bytes)) {
    const r = new ByteReader(bytes, s.start, s.end);
    if (s.id === 2) {
      const n = r.u32();
      for (let i = 0; i < n; i++) {
        r.name();
        r.name();
        const kind = r.u8();
        if (kind === 0) r.u32();
        else if (kind === 1) { r.u8(); readLimits(r, 'table import'); }
        else if (kind === 2) readLimits(r, 'memory import');
        else if (kind === 3) { r.u8(); r.u8(); importedGlobals++; }
        else throw invalid(`unexpected import kind ${kind}`);
      }
    } else if (s.id === 6) {
      const n = r.u32();
      for (let i = 0; i < n; i++) {
        const type = valType(r.u8(), `global ${i}`);
        const mutable = r.u8() === 1;
        constExpr(r, `initializer of global ${i}`);
        globals.push({ type, mutable });
      }
    } else if (s.id === 7) {
      const n = r.u32();
      for (let i = 0; i < n; i++) {
        const name = r.name();
        const kind = r.u8();
        const index = r.u32();
        if (kind === 3) exportsByIndex.set(index, [...(exportsByIndex.get(index) ?? []), name]);
      }
    }
  }
  const out: ExportedGlobal[] = [];
  globals.forEach((g, i) => {
    if (!g.mutable) return;
    const index = importedGlobals + i;
    const names = exportsByIndex.get(index) ?? [];
    const exportName = names.find((n) => namedGlobals.includes(n)) ?? `colo$g${index}`;
    if (!names.includes(exportName)) throw invalid(`mutable global ${index} is not exported as ${exportName}`);
    out.push({ index, exportName, type: g.type });
  });
  return out;
}

/** Active data segments (constant offsets) of a module, in section order. */
export function readActiveDataSegments(bytes: Uint8Array): { offset: number; size: number }[] {
  const out: { offset: number; size: number }[] = [];
  for (const s of readSections(bytes)) {
    if (s.id !== 11) continue;
    const r = new ByteReader(bytes, s.start, s.end);
    const n = r.u32();
    for (let i = 0; i < n; i++) {
      const flags = r.u32();
      let offset: number | null = null;
      if (flags === 0 || flags === 2) {
        if (flags === 2) r.u32();
        offset = constExpr(r, `data segment ${i}`);
        if (offset === null) throw invalid(`data segment ${i} has a non-constant offset`);
      }
      const size = r.u32();
      r.skip(size);
      if (offset !== null) out.push({ offset: offset >>> 0, size });
    }
  }
  return out;
}

/** The union of [offset, offset + size) ranges, as sorted disjoint [start, end) pairs. */
export function coveredRanges(segments: readonly { offset: number; size: number }[]): [number, number][] {
  const sorted = segments.filter((s) => s.size > 0).map((s): [number, number] => [s.offset, s.offset + s.size]);
  sorted.sort((a, b) => a[0] - b[0]);
  const out: [number, number][] = [];
  for (const [a, b] of sorted) {
    const last = out[out.length - 1];
    if (last !== undefined && a <= last[1]) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}
