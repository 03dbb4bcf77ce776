import fs from 'node:fs';
import * as v from '../../core/validate.js';

/** A change in whether the console takes writes: failing (the first error of a streak), or working again. */
export type SerialReport = { failing: true; message: string } | { failing: false; droppedBytes: number };

/** The serial console: guest stdout/stderr to a file descriptor (a file, or the host's stdout). */
export class Serial {
  bytesWritten = 0;
  /** In a streak of failed writes (a full disk, a closed pipe): reported once, at its start. */
  private failing = false;
  private droppedBytes = 0;
  constructor(
    private readonly fd: number | null,
    private readonly report: (r: SerialReport) => void = () => undefined,
  ) {}

  /**
   * Write `bytes`; returns how many went out. A console that takes nothing for now (the
   * host's stdout a pipe nobody reads: EAGAIN) is waited for with `waitForRoom`, which returns
   * false when the vCPU must stop instead (a pause): the write is then short, maybe 0.
   */
  write(bytes: Uint8Array, waitForRoom: () => boolean = () => true): number {
    let done = 0;
    if (this.fd === null) done = bytes.byteLength;
    while (done < bytes.byteLength) {
      try {
        done += fs.writeSync(this.fd!, bytes, done, bytes.byteLength - done);
        if (this.failing) {
          this.failing = false;
          this.report({ failing: false, droppedBytes: this.droppedBytes });
        }
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EAGAIN') {
          if (waitForRoom()) continue;
          break;
        }
        // A broken console does not stop the guest (QEMU drops the output too), but the first
        // failure of a streak is said once: a guest's log does not vanish unnoticed.
        if (!this.failing) {
          this.failing = true;
          this.droppedBytes = 0;
          this.report({ failing: true, message: (err as Error).message });
        }
        this.droppedBytes += bytes.byteLength - done;
        done = bytes.byteLength;
      }
    }
    this.bytesWritten += done;
    return done;
  }

  save(): { bytesWritten: number } {
    return { bytesWritten: this.bytesWritten };
  }

  restore(raw: unknown): void {
    const s = v.record(raw, 'serial');
    this.bytesWritten = v.uint(s.bytesWritten, 'serial.bytesWritten');
  }
}
