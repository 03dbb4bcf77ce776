/**
 * fl64: the checksum of multifd page packets (docs/migration-protocol.md).
 *
 * zlib's crc32 runs at about 3.5 GB/s per thread on the build machines, which would cost a
 * multifd channel more CPU than the TCP copy itself. fl64 is a Fletcher-style sum computed
 * with WebAssembly SIMD at about 20 GB/s:
 *
 *   the input is read as 32-bit little-endian words in blocks of 16 bytes (the last block
 *   padded with zeros); four lanes j = 0..3 keep, modulo 2^64,
 *     A[j] += word[j]   (A starts at 1, 2, 3, 4)
 *     B[j] += A[j]      (B starts at 0)
 *   and the result is h = mix(length), then h = mix(h ^ x) for x in A[0..3], B[0..3], where
 *   mix is the splitmix64 finaliser.
 *
 * What it catches: every error confined to one 32-bit word, and every error in two words
 * (A catches a change that does not cancel within a lane; B then sees the same change scaled
 * by the two positions' distance, which is not a multiple of 2^64), reordered words and
 * blocks, and length changes. Three or more coordinated word changes can cancel, as with any
 * Fletcher sum; the packet header also carries a crc32 of its own and each packet is numbered,
 * so a proxy that drops, repeats or shuffles packets is caught by other fields.
 *
 * The module imports its memory: data must be placed in that memory (a multifd worker's
 * staging buffer is that memory) before it is summed.
 */
export const fl64Wat = `(module
  (import "env" "memory" (memory 1))
  (func (export "fl64") (param $p i32) (param $n i32) (result i64)
    (local $end i32) (local $a v128) (local $b v128) (local $c v128) (local $d v128) (local $x v128)
    (local $lo i64) (local $hi i64) (local $k i32) (local $h i64)
    (local.set $a (v128.const i64x2 1 2))
    (local.set $b (v128.const i64x2 3 4))
    (local.set $end (i32.add (local.get $p) (i32.and (local.get $n) (i32.const -16))))
    (block $done
      (loop $blocks
        (br_if $done (i32.ge_u (local.get $p) (local.get $end)))
        (local.set $x (v128.load align=1 (local.get $p)))
        (local.set $a (i64x2.add (local.get $a) (i64x2.extend_low_i32x4_u (local.get $x))))
        (local.set $b (i64x2.add (local.get $b) (i64x2.extend_high_i32x4_u (local.get $x))))
        (local.set $c (i64x2.add (local.get $c) (local.get $a)))
        (local.set $d (i64x2.add (local.get $d) (local.get $b)))
        (local.set $p (i32.add (local.get $p) (i32.const 16)))
        (br $blocks)))
    (if (i32.and (local.get $n) (i32.const 15))
      (then
        (block $tdone
          (loop $tail
            (br_if $tdone (i32.ge_u (local.get $k) (i32.and (local.get $n) (i32.const 15))))
            (if (i32.lt_u (local.get $k) (i32.const 8))
              (then (local.set $lo (i64.or (local.get $lo)
                 (i64.shl (i64.load8_u (i32.add (local.get $p) (local.get $k))) (i64.extend_i32_u (i32.shl (local.get $k) (i32.const 3)))))))
              (else (local.set $hi (i64.or (local.get $hi)
                 (i64.shl (i64.load8_u (i32.add (local.get $p) (local.get $k))) (i64.extend_i32_u (i32.shl (i32.sub (local.get $k) (i32.const 8)) (i32.const 3))))))))
            (local.set $k (i32.add (local.get $k) (i32.const 1)))
            (br $tail)))
        (local.set $x (i64x2.replace_lane 1 (i64x2.splat (local.get $lo)) (local.get $hi)))
        (local.set $a (i64x2.add (local.get $a) (i64x2.extend_low_i32x4_u (local.get $x))))
        (local.set $b (i64x2.add (local.get $b) (i64x2.extend_high_i32x4_u (local.get $x))))
        (local.set $c (i64x2.add (local.get $c) (local.get $a)))
        (local.set $d (i64x2.add (local.get $d) (local.get $b)))))
    (local.set $h (call $mix (i64.extend_i32_u (local.get $n))))
    (local.set $h (call $mix (i64.xor (local.get $h) (i64x2.extract_lane 0 (local.get $a)))))
    (local.set $h (call $mix (i64.xor (local.get $h) (i64x2.extract_lane 1 (local.get $a)))))
    (local.set $h (call $mix (i64.xor (local.get $h) (i64x2.extract_lane 0 (local.get $b)))))
    (local.set $h (call $mix (i64.xor (local.get $h) (i64x2.extract_lane 1 (local.get $b)))))
    (local.set $h (call $mix (i64.xor (local.get $h) (i64x2.extract_lane 0 (local.get $c)))))
    (local.set $h (call $mix (i64.xor (local.get $h) (i64x2.extract_lane 1 (local.get $c)))))
    (local.set $h (call $mix (i64.xor (local.get $h) (i64x2.extract_lane 0 (local.get $d)))))
    (call $mix (i64.xor (local.get $h) (i64x2.extract_lane 1 (local.get $d)))))
  (func $mix (param $x i64) (result i64)
    (local.set $x (i64.mul (i64.xor (local.get $x) (i64.shr_u (local.get $x) (i64.const 30))) (i64.const 0xbf58476d1ce4e5b9)))
    (local.set $x (i64.mul (i64.xor (local.get $x) (i64.shr_u (local.get $x) (i64.const 27))) (i64.const 0x94d049bb133111eb)))
    (i64.xor (local.get $x) (i64.shr_u (local.get $x) (i64.const 31))))
)`;

/** fl64Wat compiled with binaryen (optimize level 3); test/migration/checksum.test.ts checks it. */
const fl64WasmBase64 =
  'AGFzbQEAAAABBwFgAn9/AX4CDwEDZW52Bm1lbW9yeQIAAQMCAQAHCAEEZmw2NAAACuIFAd8FAwJ+An8Fe/0MAQAAAAAAAAACAAAAAAAAACEG/QwDAAAAAAAAAAQAAAAAAAAAIQcgACABQXBxaiEFA0AgACAFSQRAIAkgBiAA/QAAACIK/ckB/c4BIgb9zgEhCSAIIAcgCv3KAf3OASIH/c4BIQggAEEQaiEADAELCyABQQ9xBEADQCABQQ9xIARLBEAgBEEISQRAIAIgACAEajEAACAEQQN0rYaEIQIFIAMgACAEajEAACAEQQhrQQN0rYaEIQMLIARBAWohBAwBCwsgCSAGIAL9EiAD/R4BIgr9yQH9zgEiBv3OASEJIAggByAK/coB/c4BIgf9zgEhCAsgAa0iAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgBv0dAIUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgBv0dAYUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgB/0dAIUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgB/0dAYUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgCf0dAIUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgCf0dAYUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgCP0dAIUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgCP0dAYUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUL';

/** The same code importing a shared memory (up to 4 GiB): fl64 straight over guest RAM. */
export const fl64SharedWat = fl64Wat.replace('(import "env" "memory" (memory 1))', '(import "env" "memory" (memory 1 65536 shared))');

/** fl64SharedWat compiled with binaryen (optimize level 3, features SIMD128 + atomics). */
const fl64SharedWasmBase64 =
  'AGFzbQEAAAABBwFgAn9/AX4CEgEDZW52Bm1lbW9yeQIDAYCABAMCAQAHCAEEZmw2NAAACuIFAd8FAwJ+An8Fe/0MAQAAAAAAAAACAAAAAAAAACEG/QwDAAAAAAAAAAQAAAAAAAAAIQcgACABQXBxaiEFA0AgACAFSQRAIAkgBiAA/QAAACIK/ckB/c4BIgb9zgEhCSAIIAcgCv3KAf3OASIH/c4BIQggAEEQaiEADAELCyABQQ9xBEADQCABQQ9xIARLBEAgBEEISQRAIAIgACAEajEAACAEQQN0rYaEIQIFIAMgACAEajEAACAEQQhrQQN0rYaEIQMLIARBAWohBAwBCwsgCSAGIAL9EiAD/R4BIgr9yQH9zgEiBv3OASEJIAggByAK/coB/c4BIgf9zgEhCAsgAa0iAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgBv0dAIUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgBv0dAYUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgB/0dAIUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgB/0dAYUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgCf0dAIUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgCf0dAYUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgCP0dAIUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUgCP0dAYUiAkIeiCAChUK5y5Pn0e2RrL9/fiICQhuIIAKFQuujxJmxt5LolH9+IgJCH4ggAoUL';

let compiled: WebAssembly.Module | null = null;
let compiledShared: WebAssembly.Module | null = null;

/** The compiled module (cached; a WebAssembly.Module can also be posted to a worker). */
export function fl64Module(): WebAssembly.Module {
  compiled ??= new WebAssembly.Module(Buffer.from(fl64WasmBase64, 'base64'));
  return compiled;
}

/** The compiled shared-memory module. */
export function fl64SharedModule(): WebAssembly.Module {
  compiledShared ??= new WebAssembly.Module(Buffer.from(fl64SharedWasmBase64, 'base64'));
  return compiledShared;
}

/** fl64 over a shared WebAssembly.Memory that someone else owns (guest RAM). */
export class Fl64Over {
  private readonly fn: (p: number, n: number) => bigint;

  constructor(readonly memory: WebAssembly.Memory, module: WebAssembly.Module = fl64SharedModule()) {
    const inst = new WebAssembly.Instance(module, { env: { memory } });
    this.fn = inst.exports.fl64 as (p: number, n: number) => bigint;
  }

  sum(offset: number, length: number): bigint {
    if (offset < 0 || length < 0 || offset + length > this.memory.buffer.byteLength) {
      throw new RangeError(`fl64 range ${offset}+${length} is outside the memory`);
    }
    return BigInt.asUintN(64, this.fn(offset, length));
  }
}

/** A staging memory with fl64 over it. */
export class Fl64 {
  readonly memory: WebAssembly.Memory;
  private readonly fn: (p: number, n: number) => bigint;

  /** @param bytes staging memory size, rounded up to whole 64 KiB pages; it never grows. */
  constructor(bytes: number, module: WebAssembly.Module = fl64Module()) {
    const pages = Math.max(1, Math.ceil(bytes / 65536));
    this.memory = new WebAssembly.Memory({ initial: pages, maximum: pages });
    const inst = new WebAssembly.Instance(module, { env: { memory: this.memory } });
    this.fn = inst.exports.fl64 as (p: number, n: number) => bigint;
  }

  /** A Buffer over the whole staging memory (stable: the memory never grows). */
  buffer(): Buffer {
    return Buffer.from(this.memory.buffer);
  }

  /** fl64 of staging bytes [offset, offset + length). */
  sum(offset: number, length: number): bigint {
    if (offset < 0 || length < 0 || offset + length > this.memory.buffer.byteLength) {
      throw new RangeError(`fl64 range ${offset}+${length} is outside the staging memory`);
    }
    return BigInt.asUintN(64, this.fn(offset, length));
  }
}

const mask64 = (1n << 64n) - 1n;

function mix(x: bigint): bigint {
  x = ((x ^ (x >> 30n)) * 0xbf58476d1ce4e5b9n) & mask64;
  x = ((x ^ (x >> 27n)) * 0x94d049bb133111ebn) & mask64;
  return x ^ (x >> 31n);
}

/** The definition in plain TypeScript (slow; for tests and for the documentation). */
export function fl64Reference(data: Uint8Array): bigint {
  const a = [1n, 2n, 3n, 4n];
  const b = [0n, 0n, 0n, 0n];
  const padded = new Uint8Array((data.byteLength + 15) & ~15);
  padded.set(data);
  const dv = new DataView(padded.buffer);
  for (let o = 0; o < padded.byteLength; o += 16) {
    for (let j = 0; j < 4; j++) {
      a[j] = (a[j]! + BigInt(dv.getUint32(o + 4 * j, true))) & mask64;
      b[j] = (b[j]! + a[j]!) & mask64;
    }
  }
  let h = mix(BigInt(data.byteLength));
  for (const x of [...a, ...b]) h = mix(h ^ x);
  return h;
}
