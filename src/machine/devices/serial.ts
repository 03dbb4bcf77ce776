import fs from 'node:fs';
import * as v from '../../core/validate.js';

/** The serial console: guest stdout/stderr to a file descriptor (a file, or the host's stdout). */
export class Serial {
  bytesWritten = 0;
  constructor(private readonly fd: number | null) {}

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
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EAGAIN') {
          if (waitForRoom()) continue;
          break;
        }
        done = bytes.byteLength; // a broken console does not stop the guest
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
