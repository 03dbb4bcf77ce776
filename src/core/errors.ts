/**
 * One root error class with stable `code` strings (STYLE.md). Each operation has its own
 * subclass so a caller can tell a refused restore from a broken migration channel; the
 * message names the field or limit that was violated.
 */
export class ColoError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** A guest module that cannot be loaded (bad wasm, forbidden import, missing export). */
export class GuestLoadError extends ColoError {}
/** A saved machine or device state that does not fit this machine. */
export class RestoreError extends ColoError {}
/** A migration stream that is corrupted, truncated, of another version or of another machine. */
export class StreamError extends ColoError {}
/** A migration that failed or was cancelled. */
export class MigrationError extends ColoError {}
/** A COLO protocol or failover failure. */
export class ColoProtocolError extends ColoError {}
/** `colo up`: a supervised pair that could not be started, protected or failed over. */
export class PairError extends ColoError {}
/**
 * A disk image that another live process holds (QEMU's 'Failed to get "write" lock'): names
 * the image and the holder's pid, so the user knows which VM to stop.
 */
export class ImageLockError extends ColoError {
  constructor(
    readonly imagePath: string,
    readonly holderPid: number,
    message: string,
  ) {
    super('DRIVE_LOCKED', message);
  }
}
/** A command-line option that cannot be honoured. */
export class UsageError extends ColoError {}
/** A QMP command that failed; `errorClass` is QEMU's error class name. */
export class QmpCommandError extends ColoError {
  readonly errorClass: string;
  constructor(errorClass: string, message: string) {
    super('QMP_' + errorClass.toUpperCase(), message);
    this.errorClass = errorClass;
  }
}
/** The peer of a channel went away or a channel was closed on purpose (yank, failover). */
export class ChannelClosedError extends ColoError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('CHANNEL_CLOSED', message, options);
  }
}
/** A wait that did not see what it awaited in time. */
export class TimeoutError extends ColoError {
  constructor(message: string) {
    super('TIMEOUT', message);
  }
}

export function errorMessage(err: unknown): string {
  if (err instanceof Error) return err.message;
  // binaryen.js throws plain objects with a message ("[object Object]" otherwise).
  const message = typeof err === 'object' && err !== null ? (err as { message?: unknown }).message : undefined;
  if (typeof message === 'string') return message;
  return String(err);
}
