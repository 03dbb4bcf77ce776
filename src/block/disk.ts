import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { limits } from '../core/limits.js';
import { ColoError, RestoreError, UsageError, errorMessage } from '../core/errors.js';
import * as v from '../core/validate.js';
import { lockImage, type ImageLock } from './image-lock.js';

const blockBytes = limits.diskBlockBytes;

/** Errors the guest sees as errno values rather than as host failures. */
export class DiskIoError extends ColoError {}

/**
 * Everything a thread needs to attach to a disk: file descriptors are process-wide and the
 * maps are SharedArrayBuffers, so the vCPU worker, the main thread and migration workers all
 * see one disk.
 */
export interface DiskSpec {
  imagePath: string;
  imageFd: number;
  sizeBytes: number;
  /** Writes go to a private overlay; the image is never written. */
  snapshot: boolean;
  overlayFd: number | null;
  /** One byte per block: 1 = the block's current content is in the overlay. */
  presentMap: SharedArrayBuffer;
  /** One byte per block: 1 = written since the dirty log was last collected. */
  dirtyMap: SharedArrayBuffer;
  /**
   * The COLO secondary's own-writes layer: an unlinked file, a map of the blocks it holds,
   * and an Int32 flag (1 = the guest's writes go to the layer). See beginLayer().
   */
  layerFd: number;
  layerMap: SharedArrayBuffer;
  layerCtl: SharedArrayBuffer;
}

export interface DiskOverlayState {
  sizeBytes: number;
  blocks: number[];
  data: Uint8Array;
}

/**
 * The VM's disk (guest fd 4): a raw image of 4 KiB blocks. In snapshot mode the writes go to
 * an unlinked temporary overlay file, so the image stays byte-for-byte unchanged and nothing
 * is left behind when the process dies.
 */
export class Disk {
  readonly spec: DiskSpec;
  private readonly present: Uint8Array;
  private readonly dirty: Uint8Array;
  private readonly layer: Uint8Array;
  private readonly layerCtl: Int32Array;
  private readonly scratch = Buffer.alloc(blockBytes);
  /** This process's lock on the image (main thread only; null: not taken, or not possible). */
  private lock: ImageLock | null = null;
  private lockPending = false;

  private constructor(spec: DiskSpec) {
    this.spec = spec;
    this.present = new Uint8Array(spec.presentMap);
    this.dirty = new Uint8Array(spec.dirtyMap);
    this.layer = new Uint8Array(spec.layerMap);
    this.layerCtl = new Int32Array(spec.layerCtl);
  }

  /**
   * Open an image (main thread) and lock it (image-lock.ts): read-write excludes every other
   * user, snapshot mode shares it with other snapshot users. `lock: 'deferred'` (an incoming
   * migration's destination, as QEMU's inactive image, --snapshot or not) opens it without the
   * lock until activate().
   */
  static open(imagePath: string, opts: { snapshot: boolean; lock?: 'now' | 'deferred' }): Disk {
    let imageFd: number;
    try {
      // Non-blocking: a FIFO would otherwise block the open (and the process) until a writer came.
      imageFd = fs.openSync(imagePath, (opts.snapshot ? fs.constants.O_RDONLY : fs.constants.O_RDWR) | fs.constants.O_NONBLOCK);
    } catch (err) {
      throw new UsageError('DRIVE_OPEN', `cannot open drive '${imagePath}': ${(err as Error).message}`);
    }
    const st = fs.fstatSync(imageFd);
    if (!st.isFile()) {
      // A directory opens read-only (snapshot mode) and a device's size reads as 0: every
      // guest access would fail or find no disk. The drive is a raw image file.
      fs.closeSync(imageFd);
      throw new UsageError('DRIVE_OPEN', `cannot open drive '${imagePath}': ${st.isDirectory() ? 'it is a directory' : 'not a regular file'} (the drive is a raw image file: colo img create)`);
    }
    const sizeBytes = st.size;
    if (sizeBytes > limits.diskBytesMax) {
      fs.closeSync(imageFd);
      throw new UsageError('DRIVE_SIZE', `drive '${imagePath}' is ${sizeBytes} bytes, above the limit of ${limits.diskBytesMax}`);
    }
    const deferred = opts.lock === 'deferred';
    let lock: ImageLock | null = null;
    if (!deferred) {
      try {
        lock = lockImage(imagePath, opts.snapshot ? 'read' : 'write');
      } catch (err) {
        fs.closeSync(imageFd);
        throw err;
      }
    }
    const blocks = Math.ceil(sizeBytes / blockBytes);
    let overlayFd: number | null = null;
    let layerFd: number;
    try {
      if (opts.snapshot) overlayFd = openScratch('colo-overlay');
      layerFd = openScratch('colo-layer');
    } catch (err) {
      for (const fd of [imageFd, overlayFd]) if (fd !== null) fs.closeSync(fd);
      lock?.release();
      throw new UsageError('DRIVE_SCRATCH', `cannot make the scratch file for drive '${imagePath}' in ${os.tmpdir()} (TMPDIR): ${errorMessage(err)}`);
    }
    const disk = new Disk({
      layerFd,
      layerMap: new SharedArrayBuffer(Math.max(1, blocks)),
      layerCtl: new SharedArrayBuffer(4),
      imagePath,
      imageFd,
      sizeBytes,
      snapshot: opts.snapshot,
      overlayFd,
      presentMap: new SharedArrayBuffer(Math.max(1, blocks)),
      dirtyMap: new SharedArrayBuffer(Math.max(1, blocks)),
    });
    disk.lock = lock;
    disk.lockPending = deferred;
    return disk;
  }

  /**
   * Take the lock deferred at open (an incoming migration that is about to use the image): the
   * write lock, or in snapshot mode the shared read lock; throws ImageLockError if another live
   * process holds the image (a writer, or for the write lock any user). Idempotent.
   */
  activate(): void {
    if (!this.lockPending) return;
    this.lock = lockImage(this.spec.imagePath, this.spec.snapshot ? 'read' : 'write');
    this.lockPending = false;
  }

  /**
   * Give the lock up while keeping the image open (QEMU's inactivation of the source's
   * image at a switchover onto the same file): the destination takes it (activate()) before it
   * runs, and a migration that fails gives it back here with activate(). No flush: both ends
   * share one file on one host (disk-sync.ts 'shared'), so the destination reads through the
   * same page cache. A snapshot destination on the source's image gives its read lock back
   * the same way when the migration fails before `go`. A no-op for unlocked images.
   */
  inactivate(): void {
    if (this.lock === null) return;
    this.lock.release();
    this.lock = null;
    this.lockPending = true;
  }

  /** True while the image is opened without its lock (deferred, see open()). */
  get inactive(): boolean {
    return this.lockPending;
  }

  /** Attach to a disk opened by another thread of this process. */
  static attach(spec: DiskSpec): Disk {
    return new Disk(spec);
  }

  get imagePath(): string {
    return this.spec.imagePath;
  }

  get sizeBytes(): number {
    return this.spec.sizeBytes;
  }

  get blockCount(): number {
    return Math.ceil(this.spec.sizeBytes / blockBytes);
  }

  /** Read at a byte offset; returns bytes read (short at the end of the disk). */
  read(into: Uint8Array, offset: number): number {
    const end = Math.min(offset + into.byteLength, this.spec.sizeBytes);
    let at = offset;
    while (at < end) {
      const block = Math.floor(at / blockBytes);
      const inBlock = at - block * blockBytes;
      const n = Math.min(blockBytes - inBlock, end - at);
      const fd = this.layer[block] === 1 ? this.spec.layerFd : this.present[block] === 1 ? this.spec.overlayFd! : this.spec.imageFd;
      readFull(fd, into.subarray(at - offset, at - offset + n), at);
      at += n;
    }
    return Math.max(0, end - offset);
  }

  /** Write at a byte offset; the whole range must lie inside the disk. */
  write(data: Uint8Array, offset: number): number {
    if (offset + data.byteLength > this.spec.sizeBytes) {
      throw new DiskIoError('DISK_BOUNDS', `write of ${data.byteLength} bytes at ${offset} goes past the end of the disk (${this.spec.sizeBytes} bytes)`);
    }
    let at = offset;
    const end = offset + data.byteLength;
    while (at < end) {
      const block = Math.floor(at / blockBytes);
      const inBlock = at - block * blockBytes;
      const n = Math.min(blockBytes - inBlock, end - at);
      const chunk = data.subarray(at - offset, at - offset + n);
      if (Atomics.load(this.layerCtl, 0) === 1) {
        if (this.layer[block] !== 1 && n < blockBytes) {
          this.readBlock(block, this.scratch);
          this.scratch.set(chunk, inBlock);
          writeFull(this.spec.layerFd, this.scratch.subarray(0, this.blockLength(block)), block * blockBytes);
        } else {
          writeFull(this.spec.layerFd, chunk, at);
        }
        this.layer[block] = 1;
      } else if (this.spec.snapshot) {
        if (this.present[block] !== 1 && n < blockBytes) {
          // Partial write of a block not yet in the overlay: copy it up first.
          this.readBlock(block, this.scratch);
          this.scratch.set(chunk, inBlock);
          writeFull(this.spec.overlayFd!, this.scratch.subarray(0, this.blockLength(block)), block * blockBytes);
        } else {
          writeFull(this.spec.overlayFd!, chunk, at);
        }
        this.present[block] = 1;
      } else {
        writeFull(this.spec.imageFd, chunk, at);
      }
      this.dirty[block] = 1;
      at += n;
    }
    return data.byteLength;
  }

  sync(): void {
    fs.fsyncSync(this.spec.snapshot ? this.spec.overlayFd! : this.spec.imageFd);
  }

  /** Bytes of this block inside the disk (the last block may be short). */
  blockLength(block: number): number {
    return Math.min(blockBytes, this.spec.sizeBytes - block * blockBytes);
  }

  readBlock(block: number, into: Uint8Array): void {
    const len = this.blockLength(block);
    const fd = this.layer[block] === 1 ? this.spec.layerFd : this.present[block] === 1 ? this.spec.overlayFd! : this.spec.imageFd;
    readFull(fd, into.subarray(0, len), block * blockBytes);
  }

  /** Write a whole block as received from a migration source or checkpoint (not marked dirty). */
  writeBlock(block: number, data: Uint8Array): void {
    if (block >= this.blockCount) throw new DiskIoError('DISK_BOUNDS', `block ${block} is past the end of the disk (${this.blockCount} blocks)`);
    const len = this.blockLength(block);
    if (this.spec.snapshot) {
      writeFull(this.spec.overlayFd!, data.subarray(0, len), block * blockBytes);
      this.present[block] = 1;
    } else {
      writeFull(this.spec.imageFd, data.subarray(0, len), block * blockBytes);
    }
  }

  /** Blocks written since the last call; clears the log. */
  collectDirty(): number[] {
    const out: number[] = [];
    const d = this.dirty;
    for (let i = 0; i < d.length; i++) {
      if (d[i] === 1) {
        d[i] = 0;
        out.push(i);
      }
    }
    return out;
  }

  /** Mark every block dirty (the first round of a storage migration). */
  markAllDirty(): void {
    this.dirty.fill(1);
  }

  /** Blocks currently held in the overlay (snapshot mode). */
  overlayBlocks(): number[] {
    const out: number[] = [];
    for (let i = 0; i < this.present.length; i++) if (this.present[i] === 1) out.push(i);
    return out;
  }

  /**
   * COLO secondary: from now on the guest's writes go to a separate layer, so that its disk
   * underneath keeps the primary's disk as of the last checkpoint (main thread, vCPU paused).
   */
  beginLayer(): void {
    Atomics.store(this.layerCtl, 0, 1);
  }

  /**
   * Checkpoint apply: forget the guest's own writes since the last checkpoint. The layer file
   * is emptied too, so that it holds one checkpoint interval's writes at most, not every block
   * the guest ever wrote (an append-only guest would otherwise fill the secondary's $TMPDIR).
   */
  dropLayer(): number {
    let n = 0;
    for (let b = 0; b < this.layer.length; b++) if (this.layer[b] === 1) {
      this.layer[b] = 0;
      n++;
    }
    if (n > 0) fs.ftruncateSync(this.spec.layerFd, 0);
    return n;
  }

  /**
   * Failover: the guest's own writes become the disk, and writes go there again (vCPU paused).
   * A block leaves the layer only once it is written, and the layer stays on until every block
   * is: a write that fails (a full filesystem: the disk under it may be sparse) throws a
   * DiskIoError and loses nothing, and a later call goes on where this one stopped.
   */
  commitLayer(): number {
    const buf = Buffer.alloc(blockBytes);
    const written: number[] = [];
    for (let b = 0; b < this.layer.length; b++) {
      if (this.layer[b] !== 1) continue;
      const len = this.blockLength(b);
      try {
        readFull(this.spec.layerFd, buf.subarray(0, len), b * blockBytes);
        this.writeBlock(b, buf);
      } catch (err) {
        if (err instanceof DiskIoError) throw err;
        const code = (err as NodeJS.ErrnoException).code;
        throw new DiskIoError(code === 'ENOSPC' ? 'DISK_FULL' : 'DISK_IO', `committing the guest's write of block ${b}: ${errorMessage(err)}`, { cause: err });
      }
      written.push(b);
    }
    // The guest synced these writes (and the checkpoints' blocks under them) when they went to
    // the layer, a scratch file: they are durable only now. The blocks leave the layer only once
    // the flush succeeded: after a failed fsync the kernel may have dropped the pages it could
    // not write and reports the error once, so a retry must write them all again, not just
    // flush (which would then succeed with the writes lost).
    try {
      this.sync();
    } catch (err) {
      throw new DiskIoError('DISK_IO', `flushing the guest's committed writes to the disk: ${errorMessage(err)}`, { cause: err });
    }
    for (const b of written) {
      this.layer[b] = 0;
      this.dirty[b] = 1;
    }
    Atomics.store(this.layerCtl, 0, 0);
    fs.ftruncateSync(this.spec.layerFd, 0);
    return written.length;
  }

  close(): void {
    this.lock?.release();
    this.lock = null;
    this.lockPending = false;
    for (const fd of [this.spec.imageFd, this.spec.overlayFd, this.spec.layerFd]) {
      if (fd === null) continue;
      try {
        fs.closeSync(fd);
      } catch {
        // already closed by another owner of the spec
      }
    }
  }

  /** Validate a saved overlay against this disk. */
  checkOverlay(raw: unknown): { blocks: number[] } {
    const s = v.record(raw, 'disk');
    const size = v.uint(s.sizeBytes, 'disk.sizeBytes');
    if (size !== this.spec.sizeBytes) {
      throw new RestoreError('STATE_DISK', `disk size ${size} in the state differs from the drive's ${this.spec.sizeBytes} bytes`);
    }
    const blocks = v.array(s.blocks, 'disk.blocks', this.blockCount).map((b, i) => v.uint(b, `disk.blocks[${i}]`, this.blockCount - 1));
    return { blocks };
  }
}

/**
 * Copy a disk image over another (colo up's last primary's disk back to --drive) and flush the
 * copy to stable storage before returning: the caller then removes the source, which may be
 * the only durable copy of what the guest synced (fd_sync) on it. Without the flush a host
 * crash soon after leaves the drive old or torn and the source gone.
 */
export function copyImage(from: string, to: string): void {
  fs.copyFileSync(from, to);
  const fd = fs.openSync(to, 'r+');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** An unnamed file in $TMPDIR (the snapshot overlay, the COLO layer and staging file): gone with the process. */
export function openScratch(prefix: string): number {
  const p = path.join(os.tmpdir(), `${prefix}-${process.pid}-${Date.now()}-${Math.random().toString(16).slice(2)}`);
  const fd = fs.openSync(p, 'w+');
  fs.unlinkSync(p);
  return fd;
}

export function readFull(fd: number, into: Uint8Array, position: number): void {
  let done = 0;
  while (done < into.byteLength) {
    const n = fs.readSync(fd, into, done, into.byteLength - done, position + done);
    if (n === 0) {
      into.fill(0, done); // a sparse or short overlay/image reads as zeros
      return;
    }
    done += n;
  }
}

export function writeFull(fd: number, data: Uint8Array, position: number): void {
  let done = 0;
  while (done < data.byteLength) {
    done += fs.writeSync(fd, data, done, data.byteLength - done, position + done);
  }
}
