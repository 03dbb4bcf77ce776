import fs from 'node:fs';
import os from 'node:os';
import { MigrationError, errorMessage } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { openScratch, readFull, writeFull } from '../block/disk.js';
import type { DiskBlockSink } from '../migration/disk-sync.js';

const blockBytes = limits.diskBlockBytes;

/** Where a block of the checkpoint waits when it is not held in memory. */
const enum Staged {
  none = 0,
  data = 1,
  zero = 2,
}

/**
 * The disk blocks of the COLO checkpoint in flight on the secondary. They reach the disk only
 * in the apply, so a failover mid-checkpoint leaves none behind; until then the first
 * `heldBytesMax` bytes of them wait in memory, the rest in an unlinked staging file in $TMPDIR
 * (opened at the first block that goes there, emptied at every apply and drop). A guest that
 * rewrites its whole disk between two checkpoints costs this process heldBytesMax of memory
 * (and a byte per disk block), not the size of the disk.
 */
export class CheckpointBlocks {
  /** Held in memory: a block's bytes, or null for a zero block. */
  private readonly held = new Map<number, Uint8Array | null>();
  /** One entry per disk block (Staged), allocated at the first block staged. */
  private staged: Uint8Array | null = null;
  private stagedCount = 0;
  private fd: number | null = null;
  private readonly heldBlocksMax: number;

  constructor(private readonly blockCount: number, heldBytesMax: number = limits.coloCheckpointDiskHeldBytesMax) {
    this.heldBlocksMax = Math.floor(heldBytesMax / blockBytes);
  }

  /** Blocks of this checkpoint so far (held and staged). */
  get count(): number {
    return this.held.size + this.stagedCount;
  }

  /** Blocks of this checkpoint that wait in the staging file (or its zero map). */
  get stagedBlocks(): number {
    return this.stagedCount;
  }

  /** A block of the checkpoint (null: a zero block); a later copy of the same block replaces it. */
  put(block: number, data: Uint8Array | null): void {
    if (this.held.has(block) || (this.held.size < this.heldBlocksMax && (this.staged === null || this.staged[block] === Staged.none))) {
      this.held.set(block, data === null ? null : Uint8Array.from(data));
      return;
    }
    const staged = (this.staged ??= new Uint8Array(this.blockCount));
    // A block that could not be staged fails the checkpoint's stream: it is never applied.
    if (data !== null) this.stage(block, data);
    if (staged[block] === Staged.none) this.stagedCount += 1;
    staged[block] = data === null ? Staged.zero : Staged.data;
  }

  /** Write every block through `write`, then forget them all (also when a write throws). */
  apply(write: DiskBlockSink): void {
    try {
      for (const [block, data] of this.held) write(block, data);
      const staged = this.staged;
      if (staged === null || this.stagedCount === 0) return;
      const buf = Buffer.alloc(blockBytes);
      for (let b = 0; b < staged.length; b++) {
        if (staged[b] === Staged.none) continue;
        if (staged[b] === Staged.zero) write(b, null);
        else {
          readFull(this.fd!, buf, b * blockBytes);
          write(b, buf);
        }
      }
    } finally {
      this.clear();
    }
  }

  /** Forget the checkpoint's blocks (a failover drops a partial checkpoint). */
  clear(): void {
    this.held.clear();
    if (this.stagedCount > 0) {
      this.staged!.fill(Staged.none);
      this.stagedCount = 0;
      if (this.fd !== null) fs.ftruncateSync(this.fd, 0);
    }
  }

  /** Process exit: the staging file goes (it is unlinked: closing it frees its space). */
  close(): void {
    this.held.clear();
    this.staged = null;
    this.stagedCount = 0;
    if (this.fd !== null) {
      try {
        fs.closeSync(this.fd);
      } catch {
        // already closed
      }
      this.fd = null;
    }
  }

  private stage(block: number, data: Uint8Array): void {
    const fd = this.stagingFd();
    try {
      writeFull(fd, data, block * blockBytes);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code === 'ENOSPC' ? 'DISK_FULL' : 'DISK_IO';
      throw new MigrationError(code, `cannot stage disk block ${block} of the checkpoint in ${os.tmpdir()} (TMPDIR): ${errorMessage(err)}`, { cause: err });
    }
  }

  private stagingFd(): number {
    if (this.fd === null) {
      try {
        this.fd = openScratch('colo-staging');
      } catch (err) {
        throw new MigrationError('DISK_IO', `cannot make the staging file for the checkpoint's disk blocks in ${os.tmpdir()} (TMPDIR): ${errorMessage(err)}`, { cause: err });
      }
    }
    return this.fd;
  }
}
