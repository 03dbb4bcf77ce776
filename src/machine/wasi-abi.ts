/** WASI preview1 constants and struct offsets (from the witx definitions). */
export const errno = {
  success: 0, badf: 8, again: 6, connreset: 15, fault: 21, fbig: 22, inval: 28, io: 29,
  nosys: 52, notconn: 53, notsock: 57, notsup: 58, nospc: 51, pipe: 64, spipe: 70,
  mfile: 33, notcapable: 76, overflow: 61, isdir: 31, acces: 2,
} as const;

export const filetype = { unknown: 0, blockDevice: 1, characterDevice: 2, directory: 3, regularFile: 4, socketStream: 6 } as const;
export const fdflags = { append: 1, dsync: 2, nonblock: 4, rsync: 8, sync: 16 } as const;
export const clockid = { realtime: 0, monotonic: 1, processCputime: 2, threadCputime: 3 } as const;
export const eventtype = { clock: 0, fdRead: 1, fdWrite: 2 } as const;
export const eventrwflagsHangup = 1;
export const subclockflagsAbstime = 1;
export const riflags = { peek: 1, waitall: 2 } as const;
export const sdflags = { rd: 1, wr: 2 } as const;
export const whence = { set: 0, cur: 1, end: 2 } as const;

/** All rights bits set: we do not model capabilities per fd beyond the fd's kind. */
export const rightsAll = 0x1fffffffn;

export const subscriptionBytes = 48;
export const eventBytes = 32;
export const filestatBytes = 64;
export const fdstatBytes = 24;

/** Thrown out of the guest by proc_exit. */
export class ProcExit {
  constructor(readonly code: number) {}
}
