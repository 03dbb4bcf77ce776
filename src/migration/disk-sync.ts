import fs from 'node:fs';
import os from 'node:os';
import { limits } from '../core/limits.js';
import { ColoError, MigrationError, StreamError, errorMessage } from '../core/errors.js';
import type { Disk } from '../block/disk.js';
import type { MainChannel } from './channel.js';
import type { RateLimit } from './rate.js';
import { decodeIndexList, encodeIndexList, FrameType, type Frame } from './stream.js';

/**
 * Disk blocks travel with RAM (ARCHITECTURE §4 "storage"): the first round sends what the
 * destination lacks, later rounds the blocks written since the round before.
 *
 * What the destination lacks depends on whether both ends open the same image file (one
 * host, or the same inode): the destination decides and says so in its `ready` reply.
 *   full     different images: every block (zero blocks as numbers only);
 *   overlay  the same image and the source in snapshot mode: only the source's overlay blocks
 *            (the base is shared and unchanged);
 *   shared   the same image written directly by the source: nothing, the file is the disk;
 *   none     no drive.
 */
export type DiskMode = 'full' | 'overlay' | 'shared' | 'none';

const blockBytes = limits.diskBlockBytes;
const zeroBlock = Buffer.alloc(blockBytes);

export interface DiskIdentity {
  /** This boot of this host: device and inode numbers name a file on one host only. */
  host: string;
  dev: number;
  ino: number;
  snapshot: boolean;
}

let bootId: string | null = null;

/** The kernel's random id of this boot (falls back to the host name where /proc lacks it). */
function thisBoot(): string {
  if (bootId === null) {
    try {
      bootId = `boot:${fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim()}`;
    } catch {
      bootId = `host:${os.hostname()}`;
    }
  }
  return bootId;
}

export function diskIdentity(disk: Disk): DiskIdentity {
  const st = fs.fstatSync(disk.spec.imageFd);
  return { host: thisBoot(), dev: st.dev, ino: st.ino, snapshot: disk.spec.snapshot };
}

/** The destination's choice, from the source's identity (setup) and its own disk. */
export function chooseDiskMode(source: unknown, disk: Disk | null): DiskMode {
  if (disk === null) return 'none';
  const s = source as Partial<DiskIdentity> | null | undefined;
  if (s === null || s === undefined || typeof s.host !== 'string' || typeof s.dev !== 'number' || typeof s.ino !== 'number') return 'full';
  const mine = diskIdentity(disk);
  // Two hosts can have a file each with the same numbers: then the whole disk must travel.
  if (mine.host !== s.host || mine.dev !== s.dev || mine.ino !== s.ino) return 'full';
  return s.snapshot === true ? 'overlay' : 'shared';
}

export class DiskSender {
  constructor(private readonly disk: Disk | null, readonly mode: DiskMode) {}

  /** Blocks of round 1; starts the dirty log from now. */
  firstRound(): number[] {
    if (this.disk === null || this.mode === 'none' || this.mode === 'shared') return [];
    this.disk.collectDirty();
    if (this.mode === 'overlay') return this.disk.overlayBlocks();
    return Array.from({ length: this.disk.blockCount }, (_, i) => i);
  }

  /** Blocks written since the last call. */
  nextRound(): number[] {
    if (this.disk === null || this.mode === 'none' || this.mode === 'shared') return [];
    return this.disk.collectDirty();
  }

  /**
   * The contents of `blocks` now, in one buffer (a COLO checkpoint copies them while the guest
   * is paused and sends them after it runs on). Null without a disk.
   */
  capture(blocks: readonly number[]): Buffer | null {
    const disk = this.disk;
    if (disk === null || blocks.length === 0) return null;
    const out = Buffer.alloc(blocks.length * blockBytes);
    for (let i = 0; i < blocks.length; i++) disk.readBlock(blocks[i]!, out.subarray(i * blockBytes, (i + 1) * blockBytes));
    return out;
  }

  /**
   * Send `blocks` as diskBlocks / diskZero frames (from `captured`, if given: see capture());
   * returns the count. `limit`: max-bandwidth, counting the channel's bytes from `limitBase`
   * on (the round's pages on the main channel share it).
   */
  async send(channel: MainChannel, blocks: readonly number[], captured: Buffer | null = null, limit: RateLimit | null = null, limitBase = channel.bytesSent): Promise<number> {
    const disk = this.disk;
    if (disk === null || blocks.length === 0) return 0;
    const per = limits.pagesPerPacketMax;
    const buf = Buffer.alloc(blockBytes);
    let data: number[] = [];
    let dataBuf = Buffer.allocUnsafe(per * blockBytes);
    let zeros: number[] = [];
    const flushData = (): void => {
      if (data.length === 0) return;
      channel.sendFrame(FrameType.diskBlocks, [encodeIndexList(data), dataBuf.subarray(0, data.length * blockBytes)]);
      data = [];
      dataBuf = Buffer.allocUnsafe(per * blockBytes);
    };
    const flushZero = (): void => {
      if (zeros.length === 0) return;
      channel.sendFrame(FrameType.diskZero, [encodeIndexList(zeros)]);
      zeros = [];
    };
    for (let i = 0; i < blocks.length; i++) {
      const b = blocks[i]!;
      if (captured !== null) captured.copy(buf, 0, i * blockBytes, (i + 1) * blockBytes);
      else {
        buf.fill(0);
        disk.readBlock(b, buf);
      }
      if (buf.equals(zeroBlock)) {
        zeros.push(b);
        if (zeros.length >= limits.multifdZeroPagesPerPacketMax) flushZero();
      } else {
        buf.copy(dataBuf, data.length * blockBytes);
        data.push(b);
        if (data.length === per) {
          flushData();
          if (limit !== null) {
            await channel.drain();
            await limit.pace(channel.bytesSent - limitBase);
          }
        }
      }
      if (i % limits.diskReadBlocksMax === limits.diskReadBlocksMax - 1) {
        // The zero blocks read so far go now, not once 16384 of them gathered: the destination
        // checks each against its own disk, and started on a frame only when the source had
        // read all of it (64 MiB of disk). It was then a frame's work behind at the pause, and
        // the downtime of a guest with a mostly empty 512 MiB drive was ~900 ms, not ~30.
        flushZero();
        await channel.drain();
      }
    }
    flushData();
    flushZero();
    await channel.drain();
    return blocks.length;
  }
}

/** Writes received blocks to the destination's disk (or hands them to a COLO sink). */
export type DiskBlockSink = (block: number, data: Uint8Array | null) => void;

export function defaultDiskSink(disk: Disk): DiskBlockSink {
  const current = Buffer.alloc(blockBytes);
  return (block, data) => {
    try {
      if (data === null) {
        // A zero block: write only where the disk does not already read zeros.
        current.fill(0);
        disk.readBlock(block, current);
        if (!current.equals(zeroBlock)) disk.writeBlock(block, zeroBlock);
        return;
      }
      disk.writeBlock(block, data);
    } catch (err) {
      throw storeError(disk, block, err);
    }
  };
}

/**
 * A received block this host could not store (its filesystem is full, an I/O error): a
 * typed error naming the file, not the bare errno message ("ENOSPC: no space left on
 * device, write"), which said neither what was written nor where.
 */
function storeError(disk: Disk, block: number, err: unknown): ColoError {
  if (err instanceof ColoError) return err;
  const where = disk.spec.snapshot ? `the snapshot overlay of '${disk.spec.imagePath}'` : `'${disk.spec.imagePath}'`;
  const code = (err as NodeJS.ErrnoException).code === 'ENOSPC' ? 'DISK_FULL' : 'DISK_IO';
  return new MigrationError(code, `cannot store disk block ${block} in ${where}: ${errorMessage(err)}`, { cause: err });
}

/** Apply a diskBlocks or diskZero frame through `sink`; returns the count. */
export function applyDiskFrame(frame: Frame, blockCount: number, sink: DiskBlockSink): number {
  if (frame.type === FrameType.diskZero) {
    const { indices } = decodeIndexList(frame, 0, blockCount);
    for (const b of indices) sink(b, null);
    return indices.length;
  }
  if (frame.type !== FrameType.diskBlocks) throw new StreamError('FRAME_ORDER', 'not a disk frame');
  const { indices, data } = decodeIndexList(frame, blockBytes, blockCount);
  for (let i = 0; i < indices.length; i++) sink(indices[i]!, data.subarray(i * blockBytes, (i + 1) * blockBytes));
  return indices.length;
}
