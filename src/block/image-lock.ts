import fs from 'node:fs';
import path from 'node:path';
import { limits } from '../core/limits.js';
import { ImageLockError, UsageError, errorMessage } from '../core/errors.js';
import { logger } from '../core/log.js';
import { procEnded, procStat } from '../core/proc.js';

const log = logger('disk');

/**
 * Disk image locking, as QEMU's (OFD locks on the image): one writer excludes every other
 * user, readers (snapshot=on) share the image with each other. Node has no fcntl locks, so the
 * lock is a directory per image file (inode), `LOCK_ROOT/DEV-INO` in one place on the host: as
 * QEMU's locks, it is one lock whatever name (hard link, symlink, a rename) the file is opened by:
 *   write                        a symlink to "PID:START", made atomically (EEXIST if held);
 *   read-PID-START-RANDOM        an empty file per reader.
 * START is the holder's start time (/proc/PID/stat field 22): an entry whose process is gone
 * (SIGKILL, a crash) or whose pid was reused is stale and is taken over by the next opener,
 * never left to block. Each side makes its own entry first and then looks for the other kind,
 * so a writer and a reader that race both see each other (both are refused) and never both
 * get the image. Entries are removed on close and on any process exit that runs 'exit'
 * listeners; the rest is the liveness check's.
 */
export type ImageLockMode = 'write' | 'read';

export interface ImageLock {
  readonly imagePath: string;
  readonly mode: ImageLockMode;
  /** Give the image up (idempotent). */
  release(): void;
}

const held = new Set<HeldLock>();
let exitHooked = false;

/** When process `pid` started (clock ticks since boot), or null where /proc has no such live pid. */
function startTimeOf(pid: number): string | null {
  const st = procStat(pid);
  // A zombie (killed, not yet reaped by its parent) holds nothing any more.
  return st === null || procEnded(st.state) ? null : st.startTime;
}

const me = `${process.pid}:${startTimeOf(process.pid) ?? '0'}`;

function parseHolder(s: string): { pid: number; start: string } | null {
  const m = /^(\d+)[:-](\d+)$/.exec(s);
  return m === null ? null : { pid: Number(m[1]), start: m[2]! };
}

function holderAlive(h: { pid: number; start: string } | null): boolean {
  // An entry that does not parse was not written by this protocol: take it for a live one.
  if (h === null) return true;
  return startTimeOf(h.pid) === h.start;
}

/**
 * Where the lock directories are: one place for the host, so that every name of one file finds
 * one lock (hard links may be in different directories). A tmpfs: gone at reboot, as the
 * processes its entries name.
 */
export const lockRoot = fs.existsSync('/dev/shm') ? '/dev/shm/colo-vm-locks' : '/tmp/colo-vm-locks';

/** The lock directory of the file `imagePath` names (tests look at its `write` entry). */
export function lockDirOf(imagePath: string): string {
  const st = fs.statSync(imagePath);
  return path.join(lockRoot, `${st.dev}-${st.ino}`);
}

/** Make lockRoot, shared by every user of the host (sticky, as /tmp). */
function makeLockRoot(): void {
  try {
    fs.mkdirSync(lockRoot);
  } catch (err) {
    if (code(err) === 'EEXIST') return;
    throw err;
  }
  fs.chmodSync(lockRoot, 0o1777);
}

function code(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException).code;
}

/**
 * No lock entry can be made (a read-only directory or filesystem, a full one): as QEMU, whose
 * locks need no room, the image opens all the same (a full disk must still open to recover).
 */
function cannotMake(err: unknown): boolean {
  const c = code(err);
  return c === 'EACCES' || c === 'EROFS' || c === 'EPERM' || c === 'ENOSPC' || c === 'EDQUOT';
}

function refused(imagePath: string, holder: { pid: number } | null, wanted: ImageLockMode, heldAs: ImageLockMode): ImageLockError {
  const pid = holder?.pid ?? 0;
  const who = holder === null ? 'another process' : `process ${pid}`;
  const what = heldAs === 'write' ? 'writes it' : 'reads it (snapshot=on)';
  return new ImageLockError(imagePath, pid, `Failed to get "${wanted}" lock on drive '${imagePath}': ${who} ${what}. Is another process using the image [${imagePath}]?`);
}

/** Remove a dead writer's entry, unless another opener replaced it meanwhile (then put that one back). */
function removeStaleWriter(dir: string, target: string): void {
  const writeEntry = path.join(dir, 'write');
  const aside = path.join(dir, `stale-${process.pid}-${Math.random().toString(16).slice(2)}`);
  try {
    fs.renameSync(writeEntry, aside);
  } catch (err) {
    if (code(err) === 'ENOENT') return;
    throw err;
  }
  if (fs.readlinkSync(aside) !== target) {
    try {
      fs.linkSync(aside, writeEntry);
    } catch {
      // a third opener took the place: it holds the image now
    }
  }
  fs.unlinkSync(aside);
}

function removeStaleReaders(dir: string, imagePath: string, wanted: ImageLockMode, own: string | null): void {
  let removed = 0;
  for (const name of fs.readdirSync(dir)) {
    if (!name.startsWith('read-') || name === own) continue;
    const holder = parseHolder(name.slice('read-'.length).split('-').slice(0, 2).join(':'));
    if (holderAlive(holder)) throw refused(imagePath, holder, wanted, 'read');
    if (++removed > limits.diskLockStaleEntriesMax) return;
    fs.rmSync(path.join(dir, name), { force: true });
  }
}

/**
 * The writer's entry: null if there is none (stale ones are removed). An entry that is stale
 * again after limits.diskLockStaleTakeoversMax takeovers (other openers keep putting dead
 * processes' entries back) is an ImageLockError, not an endless loop.
 */
function liveWriter(dir: string, imagePath: string, wanted: ImageLockMode): { pid: number; start: string } | null {
  for (let attempt = 0; attempt < limits.diskLockStaleTakeoversMax; attempt++) {
    let target: string;
    try {
      target = fs.readlinkSync(path.join(dir, 'write'));
    } catch (err) {
      if (code(err) === 'ENOENT') return null;
      throw err;
    }
    const holder = parseHolder(target);
    if (holderAlive(holder)) return holder ?? { pid: 0, start: '' };
    log.info(`taking over the lock of drive '${imagePath}' left by process ${holder!.pid}, which is gone`);
    removeStaleWriter(dir, target);
  }
  throw new ImageLockError(
    imagePath,
    0,
    `Failed to get "${wanted}" lock on drive '${imagePath}': its write entry in ${dir} was a dead process's again after ${limits.diskLockStaleTakeoversMax} takeovers (other processes keep putting such entries back)`,
  );
}

/**
 * Whether the entry `name` of `dir` is a gone process's: its write entry's target (to remove it
 * as a takeover does), true for a dead reader's or a leftover `stale-` entry, false for a live
 * one's and for anything this protocol did not write.
 */
function deadEntry(dir: string, name: string): string | boolean {
  if (name === 'write') {
    const target = fs.readlinkSync(path.join(dir, name));
    return holderAlive(parseHolder(target)) ? false : target;
  }
  if (name.startsWith('read-')) return !holderAlive(parseHolder(name.slice('read-'.length).split('-').slice(0, 2).join(':')));
  // A takeover's entry set aside (stale-PID-RANDOM) whose maker died before removing it: dead
  // if its maker is gone and the holder it names too (a live one's is being put back).
  const aside = /^stale-(\d+)-[0-9a-f]+$/.exec(name);
  if (aside === null) return false;
  const maker = procStat(Number(aside[1]));
  if (maker !== null && !procEnded(maker.state)) return false;
  return !holderAlive(parseHolder(fs.readlinkSync(path.join(dir, name))));
}

/**
 * Remove `dir` if every entry in it is a gone process's and it has not changed for
 * limits.diskLockSweepIdleMs. Entries go one by one, the write entry as a takeover removes it
 * (put back if another opener replaced it), and the directory last with rmdir: an entry made
 * meanwhile keeps it (ENOTEMPTY), and an opener that finds it gone makes it again (ENOENT).
 */
function sweepDir(dir: string): boolean {
  const st = fs.lstatSync(dir);
  if (!st.isDirectory() || Date.now() - st.mtimeMs < limits.diskLockSweepIdleMs) return false;
  const names = fs.readdirSync(dir);
  if (names.length > limits.diskLockStaleEntriesMax) return false;
  const dead: [string, string | boolean][] = [];
  for (const name of names) {
    const d = deadEntry(dir, name);
    if (d === false) return false;
    dead.push([name, d]);
  }
  for (const [name, d] of dead) {
    if (typeof d === 'string') removeStaleWriter(dir, d);
    else fs.rmSync(path.join(dir, name), { force: true });
  }
  fs.rmdirSync(dir);
  return true;
}

/**
 * A holder that is SIGKILLed (or dies before its exit listener) leaves its lock directory; only
 * an opener of the same inode takes it over, so those of deleted images stayed for good. Each
 * lock taken sweeps limits.diskLockSweepDirsMax other directories, from a random place.
 */
function sweepDeadLocks(own: string): void {
  let names: string[];
  try {
    names = fs.readdirSync(lockRoot);
  } catch {
    return;
  }
  const start = Math.floor(Math.random() * names.length);
  let removed = 0;
  for (let i = 0; i < Math.min(names.length, limits.diskLockSweepDirsMax); i++) {
    const dir = path.join(lockRoot, names[(start + i) % names.length]!);
    if (dir === own) continue;
    try {
      if (sweepDir(dir)) removed++;
    } catch {
      // Changed under us (another sweeper, a new entry), or another user's: left alone.
    }
  }
  if (removed > 0) log.debug(`removed ${removed} lock directories of processes that are gone`);
}

class HeldLock implements ImageLock {
  private released = false;
  constructor(
    readonly imagePath: string,
    readonly mode: ImageLockMode,
    private readonly dir: string,
    private readonly entry: string,
  ) {}

  release(): void {
    if (this.released) return;
    this.released = true;
    held.delete(this);
    try {
      if (this.mode === 'write') {
        // Only our own entry: after a SIGSTOP long enough, another opener could not have taken
        // it (we were alive), but never remove what is not ours.
        if (fs.readlinkSync(this.entry) === me) fs.unlinkSync(this.entry);
      } else {
        fs.unlinkSync(this.entry);
      }
      fs.rmdirSync(this.dir);
    } catch {
      // gone already, or other users' entries keep the directory
    }
  }
}

/**
 * Lock `imagePath` for this process. Returns null where no lock can be made in lockRoot (not
 * writable, or full: as QEMU, the image opens all the same, with a warning).
 */
export function lockImage(imagePath: string, mode: ImageLockMode): ImageLock | null {
  let dir: string;
  try {
    dir = lockDirOf(imagePath);
  } catch (err) {
    throw new UsageError('DRIVE_OPEN', `cannot lock drive '${imagePath}': ${errorMessage(err)}`);
  }
  for (let attempt = 0; attempt < 5; attempt++) {
    try {
      makeLockRoot();
      fs.mkdirSync(dir);
    } catch (err) {
      if (cannotMake(err)) {
        log.warn(`drive '${imagePath}' is not locked: cannot make ${dir}: ${errorMessage(err)}`);
        return null;
      }
      const c = code(err);
      if (c !== 'EEXIST') throw new UsageError('DRIVE_OPEN', `cannot lock drive '${imagePath}': ${errorMessage(err)}`);
    }
    try {
      const lock = mode === 'write' ? lockWrite(imagePath, dir) : lockRead(imagePath, dir);
      held.add(lock);
      sweepDeadLocks(dir);
      if (!exitHooked) {
        exitHooked = true;
        // A crash (an uncaught exception) or process.exit() ends the process without close().
        process.on('exit', () => {
          for (const l of [...held]) l.release();
        });
      }
      return lock;
    } catch (err) {
      // The last holder removed the directory between our mkdir and our entry: again.
      if (code(err) === 'ENOENT') continue;
      if (err instanceof ImageLockError) throw err;
      if (cannotMake(err)) {
        log.warn(`drive '${imagePath}' is not locked: cannot make its entry in ${dir}: ${errorMessage(err)}`);
        return null;
      }
      throw new UsageError('DRIVE_OPEN', `cannot lock drive '${imagePath}': ${errorMessage(err)}`);
    }
  }
  throw new UsageError('DRIVE_OPEN', `cannot lock drive '${imagePath}': ${dir} keeps disappearing`);
}

function lockWrite(imagePath: string, dir: string): HeldLock {
  const entry = path.join(dir, 'write');
  for (let attempt = 0; ; attempt++) {
    try {
      fs.symlinkSync(me, entry);
      break;
    } catch (err) {
      if (code(err) !== 'EEXIST') throw err;
      const holder = liveWriter(dir, imagePath, 'write');
      if (holder !== null) throw refused(imagePath, holder, 'write', 'write');
      if (attempt >= 3) throw refused(imagePath, null, 'write', 'write');
    }
  }
  try {
    removeStaleReaders(dir, imagePath, 'write', null);
  } catch (err) {
    fs.rmSync(entry, { force: true });
    throw err;
  }
  return new HeldLock(imagePath, 'write', dir, entry);
}

function lockRead(imagePath: string, dir: string): HeldLock {
  const name = `read-${me.replace(':', '-')}-${Math.random().toString(16).slice(2)}`;
  const entry = path.join(dir, name);
  fs.closeSync(fs.openSync(entry, 'wx'));
  try {
    const writer = liveWriter(dir, imagePath, 'read');
    if (writer !== null) throw refused(imagePath, writer, 'read', 'write');
  } catch (err) {
    fs.rmSync(entry, { force: true });
    throw err;
  }
  return new HeldLock(imagePath, 'read', dir, entry);
}
