import fs from 'node:fs';
import { limits } from '../core/limits.js';
import { ColoError, MigrationError, StreamError } from '../core/errors.js';
import type { Machine } from '../machine/machine.js';
import { applySetup, applyPagesFrame, decodeDeviceState, decodeDiskBlocks, encodeDeviceState, encodeDiskBlocks, encodePages, setupOf } from './sections.js';
import { defaultDiskSink } from './disk-sync.js';
import { encodePreamble, FrameDecoder, FrameEncoder, FrameType, frameTypeName, parseJsonPayload } from './stream.js';

/**
 * `migrate uri=file:PATH` and `--incoming file:PATH`: the whole machine, paused, as one
 * migration stream in a file. Written to a temporary name and renamed when complete, so a
 * failed save (a full disk) never leaves a truncated file under the requested name.
 */
export interface FileSaveStats {
  bytes: number;
  normalPages: number;
  zeroPages: number;
  diskBlocks: number;
}

/**
 * Where a state for `path` is written: the file a symbolic link names (the link stays), and
 * the mode an existing file has. The state goes to a new file renamed over the old one, so the
 * target must be a regular file or not exist yet: renaming over a device, a FIFO or a socket
 * would replace it (as root, /dev/full or /dev/null) with a regular file.
 */
function stateTarget(path: string): { target: string; mode: number | null } {
  let target = path;
  let st: fs.Stats | null = null;
  try {
    st = fs.statSync(path);
    target = fs.realpathSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new MigrationError('FILE_OPEN', `cannot create '${path}': ${(err as Error).message}`);
    if (fs.lstatSync(path, { throwIfNoEntry: false })?.isSymbolicLink() === true) {
      throw new MigrationError('FILE_OPEN', `cannot create '${path}': it is a symbolic link to nothing`);
    }
  }
  if (st !== null && !st.isFile()) {
    throw new MigrationError('FILE_OPEN', `cannot write a state to '${path}': it is not a regular file (a state is written to a new file that then replaces it)`);
  }
  return { target, mode: st === null ? null : st.mode & 0o7777 };
}

export function saveMachineToFile(m: Machine, vcpu: Awaited<ReturnType<Machine['saveVcpu']>>, path: string): FileSaveStats {
  const { target, mode } = stateTarget(path);
  const tmp = `${target}.tmp-${process.pid}`;
  let fd: number;
  try {
    // A stale one (a killed run; PIDs repeat in containers) goes: a new file, 0600, not one
    // with the old file's mode or a link planted at that name.
    fs.rmSync(tmp, { force: true });
    fd = fs.openSync(tmp, 'wx', 0o600);
  } catch (err) {
    throw new MigrationError('FILE_OPEN', `cannot create '${path}': ${(err as Error).message}`);
  }
  if (mode !== null) {
    // The replaced file's mode is kept (a file made private stays private), where the
    // filesystem has modes at all (vfat refuses the change: the state is written anyway).
    try {
      fs.fchmodSync(fd, mode);
    } catch {
      // keep 0600
    }
  }
  const enc = new FrameEncoder();
  let bytes = 0;
  const write = (bufs: Buffer[]): void => {
    let total = 0;
    for (const b of bufs) total += b.byteLength;
    let written = 0;
    let pending = bufs;
    while (written < total) {
      const n = fs.writevSync(fd, pending);
      written += n;
      pending = skip(pending, n);
    }
    bytes += total;
  };
  try {
    write([encodePreamble()]);
    write(enc.json(FrameType.hello, { kind: 'file', createdAt: new Date().toISOString() }));
    const setup = setupOf(m);
    write(enc.json(FrameType.setup, setup));
    const ram = m.ram();
    // The state's memory: above it (a memory larger than the guest and colo's region) all is zero.
    const pageCount = (setup.memoryPages * limits.wasmPageBytes) / limits.pageBytes;
    let normal = 0;
    let zero = 0;
    const batch = 4096;
    for (let start = 0; start < pageCount; start += batch) {
      const pages = new Uint32Array(Math.min(batch, pageCount - start));
      for (let i = 0; i < pages.length; i++) pages[i] = start + i;
      const r = encodePages(enc, ram, pages);
      normal += r.normal;
      zero += r.zero;
      write(r.frames);
    }
    let blocks: number[] = [];
    if (m.disk !== null && m.disk.spec.snapshot) {
      blocks = m.disk.overlayBlocks();
      write(encodeDiskBlocks(enc, m, blocks).frames);
    }
    write(encodeDeviceState(enc, { vcpu }));
    write(enc.json(FrameType.end, { pages: pageCount, diskBlocks: blocks.length }));
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fs.renameSync(tmp, target);
    return { bytes, normalPages: normal, zeroPages: zero, diskBlocks: blocks.length };
  } catch (err) {
    try {
      fs.closeSync(fd);
    } catch {
      // closed already
    }
    fs.rmSync(tmp, { force: true });
    if (err instanceof ColoError) throw err;
    throw new MigrationError('FILE_WRITE', `writing '${path}' failed: ${(err as Error).message}`);
  }
}

function skip(bufs: Buffer[], n: number): Buffer[] {
  const out: Buffer[] = [];
  for (const b of bufs) {
    if (n >= b.byteLength) {
      n -= b.byteLength;
      continue;
    }
    out.push(n > 0 ? b.subarray(n) : b);
    n = 0;
  }
  return out;
}

/**
 * Load a saved machine into `m` (created but never started). On any error the machine must
 * be discarded: it is never run half-loaded.
 */
export async function loadMachineFromFile(m: Machine, path: string): Promise<void> {
  let fd: number;
  try {
    fd = fs.openSync(path, 'r');
  } catch (err) {
    throw new MigrationError('FILE_OPEN', `cannot open '${path}': ${(err as Error).message}`);
  }
  const dec = new FrameDecoder();
  const chunk = Buffer.allocUnsafe(4 * 1024 * 1024);
  let phase: 'hello' | 'setup' | 'body' | 'end' | 'done' = 'hello';
  let pageCount = 0;
  let pagesSeen = 0;
  let blocksSeen = 0;
  let vcpu: ReturnType<typeof decodeDeviceState>['vcpu'] | null = null;
  try {
    for (;;) {
      let n: number;
      try {
        n = fs.readSync(fd, chunk, 0, chunk.byteLength, null);
      } catch (err) {
        throw new MigrationError('FILE_READ', `cannot read '${path}': ${(err as Error).message}`);
      }
      if (n === 0) break;
      dec.push(Buffer.from(chunk.subarray(0, n)));
      for (let f = dec.next(); f !== null; f = dec.next()) {
        const unexpected = (): never => {
          throw new StreamError('FRAME_ORDER', `unexpected ${frameTypeName(f!.type)} frame in the ${phase} phase of '${path}'`);
        };
        switch (phase) {
          case 'hello':
            if (f.type !== FrameType.hello) unexpected();
            phase = 'setup';
            break;
          case 'setup':
            if (f.type !== FrameType.setup) unexpected();
            applySetup(m, f);
            pageCount = m.ram().byteLength / limits.pageBytes;
            phase = 'body';
            break;
          case 'body':
            if (f.type === FrameType.ramPages || f.type === FrameType.ramZero) {
              pagesSeen += applyPagesFrame(f, m.ram(), pageCount).length;
            } else if (f.type === FrameType.diskBlocks) {
              if (m.disk === null) unexpected();
              const { indices, data } = decodeDiskBlocks(f, m.disk!.blockCount);
              const store = defaultDiskSink(m.disk!);
              indices.forEach((b, i) => store(b, data.subarray(i * limits.diskBlockBytes, (i + 1) * limits.diskBlockBytes)));
              blocksSeen += indices.length;
            } else if (f.type === FrameType.deviceState) {
              vcpu = decodeDeviceState(f).vcpu;
              phase = 'end';
            } else unexpected();
            break;
          case 'end': {
            if (f.type !== FrameType.end) unexpected();
            const e = parseJsonPayload(f);
            if (e.pages !== pagesSeen || e.diskBlocks !== blocksSeen) {
              throw new StreamError('STREAM_INCOMPLETE', `'${path}' announces ${String(e.pages)} pages and ${String(e.diskBlocks)} blocks but holds ${pagesSeen} and ${blocksSeen}`);
            }
            phase = 'done';
            break;
          }
          case 'done':
            unexpected();
        }
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  if (phase !== 'done' || dec.pendingBytes > 0) {
    throw new StreamError('STREAM_TRUNCATED', `'${path}' is truncated (ended in the ${phase} phase)`);
  }
  await m.restoreVcpu(vcpu!);
}
