import fs from 'node:fs';
import * as v from '../../core/validate.js';

/** The serial console: guest stdout/stderr to a file descriptor (a file, or the host's stdout). */
export class Serial {
  bytesWritten = 0;
  constructor(private readonly fd: number | null) {}

  write(bytes: Uint8Array): void {
    this.bytesWritten += bytes.byteLength;
    if (this.fd === null) return;
    let done = 0;
    while (done < bytes.byteLength) {
      try {
        done += fs.writeSync(this.fd, bytes, done, bytes.byteLength - done);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EAGAIN') continue;
        return; // a broken console does not stop the guest
      }
    }
  }

  save(): { bytesWritten: number } {
    return { bytesWritten: this.bytesWritten };
  }

  restore(raw: unknown): void {
    const s = v.record(raw, 'serial');
    this.bytesWritten = v.uint(s.bytesWritten, 'serial.bytesWritten');
  }
}
