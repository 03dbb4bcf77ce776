/**
 * `colo up GUEST.wasm --net listen=HOST:PORT [options]`: a protected pair on this host, with
 * automatic failover and re-protection. The supervision decisions are in up-core.ts; this
 * driver starts the `colo run` children, drives them over QMP and feeds the outcome back.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { QmpClient, type QmpEvent } from '../control/qmp-client.js';
import { checkGuest } from '../machine/instrument.js';
import { ChannelClosedError, PairError, QmpCommandError, TimeoutError, UsageError, errorMessage } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { logger, setLogNode } from '../core/log.js';
import { formatListen, parseListen } from '../net/frontend.js';
import { parseKeyValues, parseMemory } from './options.js';
import { copyImage } from '../block/disk.js';
import { procEnded, procStat } from '../core/proc.js';
import { lockImage, type ImageLock } from '../block/image-lock.js';
import { PairCore, type PairAction, type PairEvent, type Role } from './up-core.js';

const log = logger('up');

export interface UpOptions {
  guestPath: string;
  net: { host: string; port: number };
  memory: string;
  drive: string | null;
  channels: number | null;
  checkpointDelayMs: number;
  /** A child whose heartbeat (query-status) is this late is hung; 0: no heartbeat. */
  heartbeatTimeoutMs: number;
  /** A protection whose initial migration moves no byte for this long is a failed attempt. */
  protectTimeoutMs: number;
  stateDir: string | null;
  guestArgs: string[];
}

export const upUsage = `usage: colo up GUEST.wasm --net listen=HOST:PORT [options] [-- GUEST-ARGS...]
  --memory SIZE               guest RAM of both nodes (default 256M)
  --drive file=PATH           the primary's disk image; each secondary gets its own copy
  --parallel-connections N    checkpoints over N multifd channels
  --checkpoint-delay MS       x-checkpoint-delay (default ${limits.upCheckpointDelayMsDefault})
  --heartbeat-timeout MS      a child that does not answer QMP for this long is hung, and is
                              killed when its partner can take over (default
                              ${limits.upHeartbeatTimeoutMsDefault}; 0: no heartbeat)
  --protect-timeout MS        an initial migration into COLO that moves nothing for this
                              long is a failed attempt (default ${limits.upProtectTimeoutMs})
  --state-dir DIR             QMP sockets, serial files and secondary disks (default: a new
                              folder under the system's temporary directory)

The guest's own exit (proc_exit, or a return from _start) on the primary ends the pair, as a
guest shutdown ends QEMU's COLO: the secondary is stopped too, never takes over, and colo up
exits with the guest's exit status. A secondary whose guest exits first is no failure: the
primary runs on to its own guest's exit, for at most ${limits.coloSvmExitWaitMs / 1000} s; if it does not exit by then,
the two runs diverged: the primary goes on unprotected and is protected again.
`;

function intArg(v: string | undefined, flag: string, min: number, max: number): number {
  const n = Number(v);
  if (v === undefined || !Number.isInteger(n) || n < min || n > max) throw new UsageError('BAD_OPTION', `${flag}: expected an integer between ${min} and ${max}`);
  return n;
}

export function parseUpArgs(argv: string[]): UpOptions {
  let guestPath: string | null = null;
  let net: UpOptions['net'] | null = null;
  const o = { memory: '256M', drive: null as string | null, channels: null as number | null, checkpointDelayMs: limits.upCheckpointDelayMsDefault as number, heartbeatTimeoutMs: limits.upHeartbeatTimeoutMsDefault as number, protectTimeoutMs: limits.upProtectTimeoutMs as number, stateDir: null as string | null };
  let guestArgs: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i]!;
    if (a === '--') {
      guestArgs = argv.slice(i + 1);
      break;
    }
    let value: string | undefined;
    const eq = a.startsWith('--') ? a.indexOf('=') : -1;
    if (eq > 0) {
      value = a.slice(eq + 1);
      a = a.slice(0, eq);
    }
    const next = (): string => {
      const v = value ?? argv[++i];
      if (v === undefined) throw new UsageError('BAD_OPTION', `${a} needs a value`);
      return v;
    };
    switch (a) {
      case '--net': {
        const kv = parseKeyValues(next(), '--net');
        const listen = kv.get('listen');
        if (listen === undefined || kv.size !== 1) throw new UsageError('BAD_OPTION', '--net: expected listen=HOST:PORT');
        // As colo run reads it (an IPv6 host in brackets): both children get it back as given.
        const a = parseListen(listen);
        net = { host: a.host, port: intArg(String(a.port), '--net listen port', 1, 65535) };
        break;
      }
      case '--memory':
      case '-m':
        o.memory = next();
        // Checked as colo run checks it: a size the children refuse started a pair that failed.
        parseMemory(o.memory);
        break;
      case '--drive': {
        const kv = parseKeyValues(next(), '--drive', 'file');
        const file = kv.get('file');
        if (file === undefined || kv.size !== 1) throw new UsageError('BAD_OPTION', '--drive: expected file=PATH');
        o.drive = path.resolve(file);
        break;
      }
      case '--parallel-connections':
        o.channels = intArg(next(), a, 1, limits.multifdChannelsMax);
        break;
      case '--checkpoint-delay':
        o.checkpointDelayMs = intArg(next(), a, 1, 24 * 3600 * 1000);
        break;
      case '--heartbeat-timeout': {
        const ms = intArg(next(), a, 0, 24 * 3600 * 1000);
        if (ms !== 0 && ms < 2 * limits.upHeartbeatIntervalMs) throw new UsageError('BAD_OPTION', `${a}: expected 0 (off) or at least ${2 * limits.upHeartbeatIntervalMs} ms`);
        o.heartbeatTimeoutMs = ms;
        break;
      }
      case '--protect-timeout':
        o.protectTimeoutMs = intArg(next(), a, 1, 24 * 3600 * 1000);
        break;
      case '--state-dir':
        o.stateDir = path.resolve(next());
        break;
      default:
        if (a.startsWith('-') || guestPath !== null) throw new UsageError('BAD_OPTION', `unexpected '${argv[i]}'\n${upUsage}`);
        guestPath = path.resolve(a);
    }
  }
  if (guestPath === null || net === null) throw new UsageError('BAD_OPTION', upUsage.trimEnd());
  if (o.drive !== null && !fs.existsSync(o.drive)) throw new UsageError('BAD_OPTION', `--drive: '${o.drive}' does not exist (create it with colo img create)`);
  return { guestPath, net, ...o, guestArgs };
}

interface Child {
  readonly id: number;
  readonly role: Role;
  /** Null for a child adopted from a supervisor that died (not this process's child: its exit is polled). */
  readonly proc: ChildProcess | null;
  pid: number | null;
  /** Called once, when the process ended (exitWithin). */
  readonly exitListeners: Set<() => void>;
  readonly qmpPath: string;
  readonly disk: string | null;
  /** Whether the supervisor created the disk (and may remove it). */
  readonly ownDisk: boolean;
  /** The driver's QMP connection (commands, and the events the supervisor acts on). */
  qmp: QmpClient | null;
  /** The driver's connection being made again (the child dropped the last one while it lives). */
  reconnecting: Promise<QmpClient | null> | null;
  /** The heartbeat's own QMP connection (never queued behind the driver's commands). */
  heartbeat: QmpClient | null;
  exited: boolean;
  /** The supervisor sent it a signal (signalChild): its QMP connection closing is expected. */
  signalled: boolean;
}

const mainJs = fileURLToPath(new URL('./main.js', import.meta.url));

/** A child's pid file, next to its QMP socket (vmN.pid). */
function pidFile(qmpPath: string): string {
  return qmpPath.replace(/\.qmp$/, '.pid');
}

/**
 * Whether a process `pid` exists (EPERM: it does, another user's) and has not ended. A zombie
 * has ended: an adopted child that dies is reaped by init, not by this supervisor, and an init
 * that reaps late (every 2 s in some containers) or never would hold up its failover as long.
 */
function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  const st = procStat(pid);
  return st === null || !procEnded(st.state); // no /proc: what kill says
}

/** Send `signal` to `c` unless it ended (its own child process, or an adopted one by pid). */
function signalChild(c: Child, signal: NodeJS.Signals): void {
  if (c.exited) return;
  c.signalled = true;
  try {
    if (c.proc !== null) c.proc.kill(signal);
    else if (c.pid !== null) process.kill(c.pid, signal);
  } catch (err) {
    log.debug(`vm${c.id}: ${signal}: ${errorMessage(err)}`);
  }
}

/** A run state the guest does not run again from (a failover that could not run it leaves one). */
function guestDead(status: string | undefined): boolean {
  return status === 'internal-error' || status === 'guest-panicked';
}

class UpDriver {
  private readonly core: PairCore;
  private readonly children = new Map<number, Child>();
  private readonly timers = new Set<NodeJS.Timeout>();
  /** With the heartbeat off: the children whose crashed guest is being watched (watchCrash), and since when each has been crashed. */
  private readonly crashWatched = new Map<number, number>();
  private readonly address: string;
  private finish!: (code: number) => void;
  private finished = false;
  /** False once stdout broke (its reader went away): the lines are then only logged. */
  private stdoutOpen = true;
  readonly done = new Promise<number>((r) => (this.finish = r));
  /** The last primary's disk, left in the state folder because it could not become the --drive image. */
  keptDisk: string | null = null;

  constructor(private readonly o: UpOptions, private readonly stateDir: string) {
    this.address = formatListen(o.net);
    this.core = new PairCore({ address: this.address, stateDir });
  }

  /**
   * stdout failed (EPIPE: the reader of a pipe, `| tee`, `| head`, went away). The pair goes on
   * without it: an unhandled 'error' would end the supervisor, and its exit handler would kill
   * both children, turning a lost log reader into a lost service.
   */
  stdoutFailed(err: Error): void {
    if (!this.stdoutOpen) return;
    this.stdoutOpen = false;
    log.warn(`stdout is gone (${err.message}); the pair runs on, and its state lines go to the log`);
  }

  /** A state line on stdout; in the log instead once stdout failed (also the line whose write failed). */
  private print(line: string): void {
    if (!this.stdoutOpen) {
      log.info(line);
      return;
    }
    process.stdout.write(line + '\n', (err) => {
      if (err === null || err === undefined) return;
      this.stdoutFailed(err);
      log.info(line);
    });
  }

  dispatch(e: PairEvent): void {
    for (const a of this.core.step(e)) this.perform(a);
    this.forgetReplaced();
  }

  /**
   * Drops the children the core forgot (dead, and neither primary nor secondary): each holds
   * its process handle and its two closed QMP clients with their event logs (a STOP and a
   * RESUME per checkpoint), which a supervisor that re-protects for years would otherwise keep
   * for every secondary it ever started. Operations still running on one (a protection whose
   * secondary died) hold their own references.
   */
  private forgetReplaced(): void {
    // Before start or adopt the core knows no node: children being adopted are not replaced ones.
    if (this.core.primary === null) return;
    for (const c of this.children.values()) {
      if (!c.exited || this.core.node(c.id) !== undefined) continue;
      this.children.delete(c.id);
      // Its disk was discarded when it was replaced (a replaced node's disk is never the
      // newest); keepDisk, which would remove a leftover at exit, no longer sees it.
      if (c.ownDisk && c.disk !== null) {
        try {
          fs.rmSync(c.disk, { force: true });
        } catch (err) {
          log.warn(`could not remove the disk copy of vm${c.id}: ${errorMessage(err)}`);
        }
      }
    }
  }

  private perform(a: PairAction): void {
    switch (a.type) {
      case 'print':
        this.print(a.line);
        break;
      case 'log':
        log[a.level](a.msg);
        break;
      case 'spawn':
        this.spawnChild(a.node, a.role);
        break;
      case 'protect': {
        const p = this.children.get(a.primary)!;
        const s = this.children.get(a.secondary)!;
        this.protect(p, s).then(
          () => this.dispatch({ type: 'protected' }),
          (err: unknown) => void this.exitsFirst(err, p, s).then(() => this.dispatch({ type: 'protectFailed', error: errorMessage(err) })),
        );
        break;
      }
      case 'takeover':
      case 'continueAlone': {
        const c = this.children.get(a.node)!;
        this.lostHeartbeat(c, a.type === 'takeover' ? 'secondary' : 'primary').then(
          () => this.dispatch(a.type === 'takeover' ? { type: 'tookOver', node: a.node } : { type: 'continued', node: a.node }),
          (err: unknown) =>
            void this.exitsFirst(err, c).then(() =>
              this.dispatch({ type: 'failoverFailed', node: a.node, error: errorMessage(err), ...(err instanceof PairError && err.code === 'FAILOVER_FAILED' ? { guestDead: true } : {}) }),
            ),
        );
        break;
      }
      case 'kill': {
        const c = this.children.get(a.node);
        if (c !== undefined) signalChild(c, a.signal);
        break;
      }
      case 'discardDisk': {
        const c = this.children.get(a.node);
        if (c?.ownDisk === true && c.disk !== null) fs.rmSync(c.disk, { force: true });
        break;
      }
      case 'setTimer':
        this.later(a.ms, () => this.dispatch(a.gen === undefined ? { type: 'timer', name: a.name } : { type: 'timer', name: a.name, gen: a.gen }));
        break;
      case 'exit':
        this.keepDisk(a.primary);
        for (const t of this.timers) clearTimeout(t);
        this.timers.clear();
        this.finished = true;
        for (const c of this.children.values()) {
          void c.qmp?.close().catch(() => undefined);
          void c.heartbeat?.close().catch(() => undefined);
        }
        // The drive does not hold the last state: not a clean stop.
        this.finish(this.keptDisk !== null && a.code === 0 ? 1 : a.code);
        break;
    }
  }

  /**
   * A child that could not be started (its files, or the spawn itself, failed: a full or
   * removed state folder, no more processes or descriptors): for the core it came up short and
   * exited, so the rules for a failed start apply (a re-protection is tried again later)
   * instead of the error escaping the supervisor and taking the serving child down with it.
   */
  private spawnFailed(id: number, why: string): void {
    setImmediate(() => {
      const c = this.children.get(id);
      if (c !== undefined) c.exited = true;
      this.dispatch({ type: 'startFailed', node: id, error: why });
      this.dispatch({ type: 'exited', node: id, code: null, signal: null });
    });
  }

  private spawnChild(id: number, role: Role): void {
    const name = `vm${id}`;
    const qmpPath = path.join(this.stateDir, `${name}.qmp`);
    let disk: string | null = null;
    let ownDisk = false;
    try {
      fs.rmSync(qmpPath, { force: true });
      if (this.o.drive !== null) {
        if (id === 1) {
          disk = this.o.drive;
        } else {
          // Its own image of the same size: the initial migration copies the whole disk.
          disk = path.join(this.stateDir, `${name}.img`);
          ownDisk = true;
          const fd = fs.openSync(disk, 'w');
          try {
            fs.ftruncateSync(fd, fs.statSync(this.o.drive).size);
          } finally {
            fs.closeSync(fd);
          }
        }
      }
    } catch (err) {
      if (ownDisk && disk !== null) fs.rmSync(disk, { force: true });
      this.spawnFailed(id, `its files could not be made ready: ${errorMessage(err)}`);
      return;
    }
    const args = [mainJs, 'run', this.o.guestPath, '--name', name, '--memory', this.o.memory, '--net', `listen=${this.address}`];
    args.push('--qmp', `unix:${qmpPath}`, '--serial', `file:${path.join(this.stateDir, `${name}.serial`)}`);
    if (disk !== null) args.push('--drive', `file=${disk}`);
    if (role === 'secondary') args.push('--incoming', 'defer');
    // The primary's guest waits (-S) until the driver's connection watches it (bringUp: cont),
    // as libvirt starts QEMU: a guest that exits at once (a short job) sent its SHUTDOWN to no
    // one, and its end was taken for a death ('pair: failed', status 1).
    else args.push('-S');
    if (this.o.guestArgs.length > 0) args.push('--', ...this.o.guestArgs);
    // Its own process group: a terminal's Ctrl-C reaches the supervisor only, which stops the
    // children itself (else a child could exit first and be taken for a failure).
    const proc = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'inherit'], detached: true });
    const c: Child = { id, role, proc, pid: proc.pid ?? null, exitListeners: new Set(), qmpPath, disk, ownDisk, qmp: null, reconnecting: null, heartbeat: null, exited: false, signalled: false };
    this.children.set(id, c);
    proc.once('exit', (code, signal) => void this.eventsRead(c).then(() => this.childExited(c, code, signal)));
    if (proc.pid !== undefined) {
      // For a supervisor that takes over from this one, should it die (adoptChildren).
      try {
        fs.writeFileSync(pidFile(qmpPath), `${proc.pid}\n`);
      } catch (err) {
        log.warn(`vm${id}: its pid file could not be written (${errorMessage(err)}): a colo up started after this one dies cannot adopt it`);
      }
    }
    if (proc.pid === undefined) {
      // The process was never created: Node emits 'error', and no 'exit' follows.
      proc.once('error', (err) => {
        if (!c.exited) this.spawnFailed(id, `it could not be started: ${err.message}`);
      });
      return;
    }
    proc.once('error', (err) => log.warn(`${name}: ${err.message}`));
    this.dispatch({ type: 'spawned', node: id, pid: proc.pid });
    this.bringUp(c).then(
      () => {
        this.dispatch({ type: 'ready', node: id });
        void this.heartbeat(c);
      },
      (err: unknown) =>
        void this.exitsFirst(err, c).then(() => {
          if (!c.exited) this.dispatch({ type: 'startFailed', node: id, error: errorMessage(err) });
        }),
    );
  }

  /**
   * Resolves once the QMP events `c` sent before its exit were read: its connections close
   * (end of stream) after the last of them, but the exit can be seen first. A guest's SHUTDOWN
   * among them makes its end the guest's, not a death (a secondary's: no failover). Waits at
   * most limits.upChildExitGraceMs.
   */
  private eventsRead(c: Child): Promise<void> {
    // Both connections: the driver's may be down (being made again) when the SHUTDOWN comes.
    const open = [c.qmp, c.heartbeat].filter((q): q is QmpClient => q !== null && !q.closed);
    if (open.length === 0 || this.finished) return Promise.resolve();
    return new Promise<void>((resolve) => {
      let left = open.length;
      const offs: (() => void)[] = [];
      const done = (): void => {
        clearTimeout(t);
        this.timers.delete(t);
        for (const off of offs) off();
        resolve();
      };
      const t = this.later(limits.upChildExitGraceMs, done);
      for (const q of open) {
        offs.push(
          q.on('close', () => {
            if (--left === 0) done();
          }),
        );
      }
    });
  }

  /** `c`'s process ended (its 'exit', or, adopted, its pid gone): once. */
  private childExited(c: Child, code: number | null, signal: NodeJS.Signals | null): void {
    if (c.exited) return;
    c.exited = true;
    void c.qmp?.close().catch(() => undefined);
    void c.heartbeat?.close().catch(() => undefined);
    // A killed child leaves its socket file behind; nothing answers there any more. (Its
    // serial file stays: it is the record of what the guest printed.)
    fs.rmSync(c.qmpPath, { force: true });
    fs.rmSync(pidFile(c.qmpPath), { force: true });
    for (const l of [...c.exitListeners]) l();
    c.exitListeners.clear();
    this.dispatch({ type: 'exited', node: c.id, code, signal });
  }

  /**
   * Take over the children of a colo up that died (`live`: the QMP sockets that answer in its
   * --state-dir). Each must have its pid file. What they are settles what is done: a protected
   * pair (a primary and a secondary in COLO) is supervised as it is; a primary whose secondary
   * died meanwhile, or a secondary whose primary died (the failover nobody ran), is told
   * x-colo-lost-heartbeat and runs alone, then is protected again; a secondary still in its
   * initial migration is killed (it protects nothing yet). Anything else is refused, the
   * children left as they are.
   */
  async adopt(live: { id: number; qmpPath: string; pid: number | null }[], nextId: number): Promise<void> {
    // Children that are no pair yet may be one a moment later (a re-protection's switchover
    // into COLO): looked at again for limits.upAdoptSettleMs before the refusal.
    const settleBy = performance.now() + limits.upAdoptSettleMs;
    let found: { c: Child; mode: string; status: string }[] = [];
    const fail = (why: string): never => {
      for (const f of found) void f.c.qmp?.close().catch(() => undefined);
      throw new UsageError('STATE_DIR', `${this.stateDir}: cannot adopt the children of the colo up that ran there: ${why}; they are left running`);
    };
    let ps: Child[];
    let ss: Child[];
    let alone: Child[];
    let incoming: Child[];
    for (;;) {
      found = await this.lookAt(live, fail);
      const inColo = (m: string): Child[] => found.filter((f) => f.mode === m).map((f) => f.c);
      alone = found.filter((f) => f.mode === 'none' && f.status !== 'inmigrate').map((f) => f.c);
      incoming = found.filter((f) => f.mode === 'none' && f.status === 'inmigrate').map((f) => f.c);
      [ps, ss] = [inColo('primary'), inColo('secondary')];
      const describe = found.map((f) => `vm${f.c.id} (pid ${f.c.pid}): COLO mode ${f.mode}, status ${f.status}`).join('; ');
      let refusal: string | null = null;
      if (ps.length + ss.length + alone.length === 0) refusal = `none of them serves (${describe})`;
      else if (ps.length > 1 || ss.length > 1 || alone.length > 1 || (alone.length === 1 && ps.length + ss.length > 0)) refusal = `they are no pair this supervisor can tell apart (${describe})`;
      if (refusal === null) break;
      if (performance.now() >= settleBy) fail(refusal);
      log.debug(`the children are no pair yet (${describe}): looking again in ${limits.upAdoptLookAgainMs} ms`);
      for (const f of found) await f.c.qmp?.close().catch(() => undefined);
      found = [];
      await new Promise<void>((resolve) => setTimeout(resolve, limits.upAdoptLookAgainMs));
    }
    for (const f of found) {
      this.children.set(f.c.id, f.c);
      this.watchControl(f.c, f.c.qmp!);
      this.pollExit(f.c);
    }
    for (const c of incoming) {
      log.info(`vm${c.id} (pid ${c.pid}) was still in its initial migration: killing it`);
      signalChild(c, 'SIGKILL');
    }
    let primary: Child;
    let secondary: Child | null = null;
    if (ps.length === 1 && ss.length === 1) {
      primary = ps[0]!;
      secondary = ss[0]!;
    } else if (ss.length === 1 || ps.length === 1) {
      // Its partner died while no supervisor watched: the failover it waits for, now.
      const c = (ss[0] ?? ps[0])!;
      log.warn(`vm${c.id} (pid ${c.pid}) is in COLO without its partner (it died while no supervisor ran): x-colo-lost-heartbeat, it runs alone`);
      try {
        await this.lostHeartbeat(c, c.role, limits.upAdoptFailoverMs);
      } catch (err) {
        // Not this supervisor's to end: the children stay as they are (the exit kills only its own).
        this.finished = true;
        this.children.clear();
        for (const t of this.timers) clearTimeout(t);
        this.timers.clear();
        return fail(`x-colo-lost-heartbeat on vm${c.id} failed (${errorMessage(err)})`);
      }
      primary = c;
    } else {
      primary = alone[0]!;
    }
    // A protected pair keeps checkpointing as the earlier run set it until its next
    // re-protection (whose configure sets every parameter): this run's delay from now on. The
    // multifd channels cannot change under COLO; they do at the next re-protection.
    if (secondary !== null) await this.adoptCheckpointDelay(primary);
    for (const c of [primary, secondary]) if (c !== null) void this.heartbeat(c);
    this.dispatch({ type: 'adopt', primary: { id: primary.id, pid: primary.pid! }, secondary: secondary === null ? null : { id: secondary.id, pid: secondary.pid! }, nextId });
    // One that ended while it was being looked at: its exit came before the core knew it.
    for (const c of [primary, secondary]) if (c !== null && c.exited) this.dispatch({ type: 'exited', node: c.id, code: null, signal: null });
  }

  /**
   * adopt's look at the children answering in the state folder: each one's pid, QMP
   * connection, COLO mode and run state. What cannot be looked at ends the adoption (`fail`).
   */
  private async lookAt(live: { id: number; qmpPath: string; pid: number | null }[], fail: (why: string) => never): Promise<{ c: Child; mode: string; status: string }[]> {
    const found: { c: Child; mode: string; status: string }[] = [];
    const failHere = (why: string): never => {
      for (const f of found) void f.c.qmp?.close().catch(() => undefined);
      return fail(why);
    };
    for (const { id, qmpPath, pid: known } of live) {
      let pid: number;
      try {
        pid = known ?? Number(fs.readFileSync(pidFile(qmpPath), 'utf8').trim());
      } catch (err) {
        return failHere(`vm${id} answers on its QMP socket but its pid file cannot be read (${errorMessage(err)})`);
      }
      if (!Number.isSafeInteger(pid) || pid <= 0 || !pidAlive(pid)) return failHere(`vm${id}'s pid file names no living process`);
      let q: QmpClient;
      let mode: string;
      let status: string;
      try {
        q = await QmpClient.connect(`unix:${qmpPath}`, { eventLogMax: limits.upQmpEventLogMax });
        mode = String((await q.execute<{ mode?: string }>('query-colo-status')).mode);
        status = String((await q.execute<{ status?: string }>('query-status')).status);
      } catch (err) {
        return failHere(`vm${id} does not answer QMP (${errorMessage(err)})`);
      }
      const differs = this.differs(pid, id);
      if (differs !== null) {
        void q.close().catch(() => undefined);
        return failHere(`vm${id} (pid ${pid}) runs with ${differs}: run colo up with the options the pair was started with`);
      }
      const disk = this.o.drive === null ? null : fs.existsSync(path.join(this.stateDir, `vm${id}.img`)) ? path.join(this.stateDir, `vm${id}.img`) : this.o.drive;
      const role: Role = mode === 'secondary' || status === 'inmigrate' ? 'secondary' : 'primary';
      const c: Child = { id, role, proc: null, pid, exitListeners: new Set(), qmpPath, disk, ownDisk: disk !== this.o.drive, qmp: q, reconnecting: null, heartbeat: null, exited: false, signalled: false };
      found.push({ c, mode, status });
    }
    return found;
  }

  /**
   * The adopted primary `c` of a protected pair checkpoints every --checkpoint-delay of this
   * run (x-checkpoint-delay, set under COLO: it takes a checkpoint at once and holds from there).
   * A primary that does not take it is only said: the pair is protected all the same.
   */
  private async adoptCheckpointDelay(c: Child): Promise<void> {
    try {
      const q = c.qmp!;
      const params = await q.execute<{ 'x-checkpoint-delay'?: number }>('query-migrate-parameters');
      const was = params['x-checkpoint-delay'];
      if (was === this.o.checkpointDelayMs) return;
      await q.execute('migrate-set-parameters', { 'x-checkpoint-delay': this.o.checkpointDelayMs });
      log.info(`vm${c.id} (pid ${c.pid}): x-checkpoint-delay ${was} ms, now ${this.o.checkpointDelayMs} ms (--checkpoint-delay of this colo up)`);
    } catch (err) {
      log.warn(`vm${c.id} (pid ${c.pid}): x-checkpoint-delay could not be set to ${this.o.checkpointDelayMs} ms (${errorMessage(err)}); it keeps the earlier colo up's until the next re-protection`);
    }
  }

  /**
   * How the command line of the adopted child `pid` (vm`id`) differs from what this supervisor
   * would start (another guest, --memory, --net or --drive: its new secondaries could never be
   * migrated into, or would serve elsewhere); null when it does not (or /proc cannot tell).
   */
  private differs(pid: number, id: number): string | null {
    const argv = commandLine(pid);
    if (argv === null) return null;
    const opt = (name: string): string | null => {
      const i = argv.indexOf(name);
      return i < 0 || i + 1 >= argv.length ? null : argv[i + 1]!;
    };
    const guest = argv[argv.indexOf('run') + 1];
    if (guest !== this.o.guestPath) return `the guest ${guest}, this colo up has ${this.o.guestPath}`;
    const memory = opt('--memory');
    const bytes = (m: string | null): number | null => {
      try {
        return m === null ? null : parseMemory(m);
      } catch {
        return null;
      }
    };
    if (bytes(memory) === null || bytes(memory) !== bytes(this.o.memory)) return `--memory ${memory}, this colo up has --memory ${this.o.memory}`;
    if (opt('--net') !== `listen=${this.address}`) return `--net ${opt('--net')}, this colo up has --net listen=${this.address}`;
    const img = path.join(this.stateDir, `vm${id}.img`);
    const drive = opt('--drive');
    const want = this.o.drive === null ? null : `file=${fs.existsSync(img) ? img : this.o.drive}`;
    if (drive !== want) return `${drive === null ? 'no --drive' : `--drive ${drive}`}, this colo up has ${this.o.drive === null ? 'none' : `--drive file=${this.o.drive}`}`;
    const dash = argv.indexOf('--');
    const args = dash < 0 ? [] : argv.slice(dash + 1, argv[argv.length - 1] === '' ? -1 : undefined);
    if (JSON.stringify(args) !== JSON.stringify(this.o.guestArgs)) return `the guest arguments ${JSON.stringify(args)}, this colo up has ${JSON.stringify(this.o.guestArgs)}`;
    return null;
  }

  /** An adopted child is not this process's: its end shows as its pid gone (reaped by its new parent). */
  private pollExit(c: Child): void {
    const poll = (): void => {
      if (c.exited || this.finished) return;
      if (!pidAlive(c.pid!)) {
        this.childExited(c, null, null);
        return;
      }
      this.later(limits.upAdoptedExitPollMs, poll);
    };
    this.later(limits.upAdoptedExitPollMs, poll);
  }

  /**
   * A command failed because the QMP connection of one of `cs` closed: a dying child closes it
   * just before its exit is seen. Give that exit up to limits.upChildExitGraceMs to come
   * first, so that the core hears of the death (`primary 123 died (SIGKILL) while the pair was
   * protecting`, `secondary 456 died (SIGKILL) while taking over`) rather than of a failed
   * command, which it would take for a live child (a failed protection attempt that kills the
   * secondary, a lost service blamed on a closed connection).
   */
  private async exitsFirst(err: unknown, ...cs: Child[]): Promise<void> {
    if (!(err instanceof ChannelClosedError)) return;
    await Promise.all(cs.filter((c) => !c.exited && c.qmp?.closed !== false).map((c) => this.exitWithin(c, limits.upChildExitGraceMs)));
  }

  private async bringUp(c: Child): Promise<void> {
    c.qmp = await QmpClient.connectWhenUp(c.qmpPath, {
      timeoutMs: limits.upChildStartTimeoutMs,
      gone: () => (c.exited ? new PairError('CHILD_EXITED', `vm${c.id} exited before its QMP socket came up`) : null),
      timedOut: () => new PairError('CHILD_START_TIMEOUT', `timed out after ${limits.upChildStartTimeoutMs} ms waiting for the QMP socket of vm${c.id}`),
      eventLogMax: limits.upQmpEventLogMax,
    });
    this.watchControl(c, c.qmp);
    if (c.exited) throw new PairError('CHILD_EXITED', `vm${c.id} exited`);
    if (c.role === 'secondary') await this.configure(c.qmp, false);
    else await c.qmp.execute('cont');
  }

  /** The events the supervisor acts on, from the driver's connection `q`; a loss of `q` while `c` lives makes it again. */
  private watchControl(c: Child, q: QmpClient): void {
    q.on('close', () => {
      if (!c.exited && !this.finished && c.qmp === q) void this.reconnectControl(c);
    });
    q.on('event', (ev) => {
      if (ev.event === 'COLO_EXIT' && !c.exited) {
        const [mode, reason] = [String(ev.data.mode), String(ev.data.reason)];
        if (mode !== 'primary' || reason !== 'error') this.dispatch({ type: 'coloExit', node: c.id, mode, reason });
        else {
          // A primary that went on alone by itself, or one whose failover could not run its
          // guest (colo/core.ts resumeFailed): its run state tells them apart.
          void q.execute<{ status?: string }>('query-status', {}, { timeoutMs: limits.upFailoverTimeoutMs }).then(
            (run) => run.status,
            () => undefined,
          ).then((status) => {
            if (!c.exited) this.dispatch({ type: 'coloExit', node: c.id, mode, reason, ...(guestDead(status) ? { guestDead: true } : {}) });
          });
        }
      }
      this.watchGuestShutdown(c, ev);
      if (ev.event === 'GUEST_PANICKED' && !c.exited) {
        const info = ev.data.info as { message?: unknown } | undefined;
        this.guestCrashed(c, String(info?.message ?? 'no details'));
      }
    });
  }

  /**
   * The guest's own exit (QEMU's SHUTDOWN with guest: true; a quit or a signal has guest:
   * false), heard on the driver's connection or the heartbeat's: the driver's may be being made
   * again when it comes (it is sent once, to the clients connected then), and a guest's end
   * taken for a death fails the pair over (or fails it: its partner's guest exits too).
   */
  private watchGuestShutdown(c: Child, ev: QmpEvent): void {
    if (ev.event !== 'SHUTDOWN' || ev.data.guest !== true || c.exited) return;
    const code = ev.data['exit-code'];
    this.dispatch(typeof code === 'number' && Number.isInteger(code) ? { type: 'guestShutdown', node: c.id, code } : { type: 'guestShutdown', node: c.id });
  }

  /**
   * The driver's connection to `c` closed. A dying child closes it just before its exit is seen
   * (given limits.upChildExitGraceMs); a living one dropped it (a client that left its output
   * unread). Without it the supervisor would never hear of `c` again (its COLO_EXIT, a crash),
   * could not protect a primary again (every attempt failing at once) nor have a secondary take
   * over (a lost service): it is made again, every limits.upHeartbeatIntervalMs for as long as
   * `c` lives (a hung child is the heartbeat's to fence). Resolves with the new connection, or
   * null once `c` exited or the supervisor finished.
   */
  private reconnectControl(c: Child): Promise<QmpClient | null> {
    c.reconnecting ??= (async (): Promise<QmpClient | null> => {
      if (await this.exitWithin(c, limits.upChildExitGraceMs)) return null;
      let said = false;
      while (!c.exited && !this.finished) {
        try {
          const q = await QmpClient.connect(`unix:${c.qmpPath}`, { eventLogMax: limits.upQmpEventLogMax });
          if (c.exited || this.finished) {
            void q.close().catch(() => undefined);
            return null;
          }
          c.qmp = q;
          this.watchControl(c, q);
          log.info(`vm${c.id}: its QMP connection closed while it runs; connected again`);
          void this.catchUp(c, q);
          return q;
        } catch (err) {
          // A child this supervisor is stopping (a signal sent: the pair's stop, a fencing)
          // removes its socket before it exits: expected, no warning.
          const line = `vm${c.id}: its QMP connection closed while it runs, and cannot be made again yet (${errorMessage(err)}); trying every ${limits.upHeartbeatIntervalMs} ms`;
          if (!said && c.signalled) log.debug(line);
          else if (!said) log.warn(line);
          said = true;
        }
        await new Promise<void>((resolve) => this.later(limits.upHeartbeatIntervalMs, resolve));
      }
      return null;
    })().finally(() => {
      c.reconnecting = null;
    });
    return c.reconnecting;
  }

  /**
   * The driver's connection to `c`: the current one, or the one being made again (waited for
   * at most `withinMs`, when given: a protection attempt does not wait for a hung child).
   */
  private async control(c: Child, withinMs?: number): Promise<QmpClient> {
    const q = c.qmp!;
    if (!q.closed) return q;
    const reconnecting = this.reconnectControl(c);
    const again =
      withinMs === undefined
        ? await reconnecting
        : await Promise.race([reconnecting, new Promise<undefined>((resolve) => this.later(withinMs, () => resolve(undefined)))]);
    if (again === undefined) throw new TimeoutError(`the QMP connection to vm${c.id} closed, and was not made again within ${withinMs} ms`);
    if (again === null) throw new ChannelClosedError(`the QMP connection to vm${c.id} closed`);
    return again;
  }

  /**
   * Events sent while the driver's connection was down are lost. Of those the supervisor acts
   * on, a COLO_EXIT shows in query-colo-status (the node is out of COLO while the pair is
   * protected), a GUEST_PANICKED in query-status; a guest's SHUTDOWN is followed by the exit.
   */
  private async catchUp(c: Child, q: QmpClient): Promise<void> {
    try {
      const run = await q.execute<{ status?: string }>('query-status');
      if (run.status === 'guest-panicked' && !c.exited) this.guestCrashed(c, 'its guest crashed while the supervisor was not connected');
      if (this.core.phase !== 'protected') return;
      const st = await q.execute<{ mode?: string; 'last-mode'?: string; reason?: string }>('query-colo-status');
      // Protected before and after the question: both nodes were in COLO (a protection takes seconds, not one reply).
      if (st.mode === 'none' && !c.exited && this.core.phase === 'protected') {
        this.dispatch({ type: 'coloExit', node: c.id, mode: String(st['last-mode']), reason: String(st.reason), ...(guestDead(run.status) ? { guestDead: true } : {}) });
      }
    } catch (err) {
      log.debug(`vm${c.id}: catching up after the QMP connection came back: ${errorMessage(err)}`);
    }
  }

  /** The guest of `c` crashed (GUEST_PANICKED, or found so by a catch-up). */
  private guestCrashed(c: Child, message: string): void {
    const at = performance.now();
    this.dispatch({ type: 'crashed', node: c.id, message, at });
    if (this.o.heartbeatTimeoutMs !== 0 || c.exited || this.finished) return;
    const watched = this.crashWatched.has(c.id);
    this.crashWatched.set(c.id, at);
    if (!watched) void this.watchCrash(c);
  }

  /**
   * With the heartbeat off (--heartbeat-timeout 0) nothing else would ever look at a crashed
   * child again, and a secondary in COLO left to the primary's resync (up-core.ts) would stay
   * crashed for ever when none comes, counting as protection it does not give. So, from its
   * crash on, `c` is asked query-status every limits.upHeartbeatIntervalMs on the driver's
   * connection, until its guest runs again (a checkpoint replaced it), it exits, or it has been
   * crashed for limits.upSecondaryCrashedMs since its last crash: then it is `stuck`, as the
   * heartbeat would say. A child that does not answer is not judged: the heartbeat is off.
   */
  private async watchCrash(c: Child): Promise<void> {
    try {
      while (!c.exited && !this.finished) {
        await new Promise<void>((resolve) => this.later(limits.upHeartbeatIntervalMs, resolve));
        const q = c.qmp;
        if (c.exited || this.finished || q === null || q.closed) continue;
        let status: string | undefined;
        const asked = performance.now();
        try {
          status = (await q.execute<{ status?: string }>('query-status')).status;
        } catch (err) {
          log.debug(`vm${c.id}: query-status for its crashed guest: ${errorMessage(err)}`);
          continue;
        }
        // Running again; unless it crashed again meanwhile (its event came after this question).
        if (status !== 'guest-panicked') {
          if (this.crashWatched.get(c.id)! < asked) return;
          continue;
        }
        const ms = performance.now() - this.crashWatched.get(c.id)!;
        if (ms >= limits.upSecondaryCrashedMs && !c.exited && !this.finished) {
          this.dispatch({ type: 'crashed', node: c.id, message: `its guest has stayed crashed for ${Math.round(ms)} ms, not replaced by a checkpoint`, at: performance.now(), stuck: true });
          return;
        }
      }
    } finally {
      this.crashWatched.delete(c.id);
    }
  }

  /**
   * Asks `c` query-status every limits.upHeartbeatIntervalMs on a QMP connection of its own.
   * A child that has not answered for the heartbeat timeout (a late reply, or no connection: one
   * that cannot be made, or that the child dropped) is `unresponsive` (once per stall; the core
   * decides whether to fence it), and `responsive` again once it answers. A connection that
   * goes away while the child lives (the server dropped a client that left its output unread)
   * is made again, every interval, for as long as the child lives: a child that is not fenced
   * for a stall must still be watched after it, or a later hang goes unnoticed and nothing
   * fails over. Ends when the child exits or the supervisor finishes.
   */
  private async heartbeat(c: Child): Promise<void> {
    const timeoutMs = this.o.heartbeatTimeoutMs;
    if (timeoutMs === 0) return this.listenOnly(c);
    const live = (): boolean => !c.exited && !this.finished;
    /** When the first request of the current run without an answer was made; null: it answers. */
    let stalledSince: number | null = null;
    let reported = false;
    /** Whether the child's refusal of the connection was said (once per run of refusals). */
    let refusalSaid = false;
    const answered = (): void => {
      if (reported && live()) this.dispatch({ type: 'responsive', node: c.id, ms: Math.round(performance.now() - stalledSince!) });
      stalledSince = null;
      reported = false;
    };
    /** `timedOut`: a request of the stall went unanswered for timeoutMs (timers may fire a little early by performance.now()). */
    const unanswered = (since: number, timedOut: boolean): void => {
      stalledSince ??= since;
      if (!reported && live() && (timedOut || performance.now() - stalledSince >= timeoutMs)) {
        reported = true;
        this.dispatch({ type: 'unresponsive', node: c.id, ms: timeoutMs });
      }
    };
    /** Since when its guest has been crashed (a secondary's is left to the primary's checkpoints, up-core.ts); null: it is not. */
    let crashedSince: number | null = null;
    let crashSaid = false;
    const crashedFor = (crashed: boolean): void => {
      if (!crashed) {
        crashedSince = null;
        crashSaid = false;
        return;
      }
      crashedSince ??= performance.now();
      const ms = performance.now() - crashedSince;
      if (!crashSaid && live() && ms >= limits.upSecondaryCrashedMs) {
        crashSaid = true;
        this.dispatch({ type: 'crashed', node: c.id, message: `its guest has stayed crashed for ${Math.round(ms)} ms, not replaced by a checkpoint`, at: performance.now(), stuck: true });
      }
    };
    while (live()) {
      const sent = performance.now();
      let hb = c.heartbeat;
      if (hb === null || hb.closed) {
        try {
          hb = await QmpClient.connect(`unix:${c.qmpPath}`, { timeoutMs, oob: false, eventLogMax: 0 });
        } catch (err) {
          if (!live()) return;
          if (err instanceof QmpCommandError) {
            // It answered, with a refusal (too many QMP clients): its main loop runs, so it is
            // not hung, but it cannot be watched until it takes the connection.
            if (!refusalSaid) log.warn(`vm${c.id} refuses the heartbeat's QMP connection (${err.message}); trying again every ${limits.upHeartbeatIntervalMs} ms`);
            refusalSaid = true;
            answered();
          } else {
            log.debug(`vm${c.id}: no heartbeat connection: ${errorMessage(err)}`);
            unanswered(sent, err instanceof TimeoutError);
          }
          await new Promise<void>((resolve) => this.later(limits.upHeartbeatIntervalMs, resolve));
          continue;
        }
        if (!live()) {
          void hb.close().catch(() => undefined);
          return;
        }
        if (refusalSaid) log.info(`vm${c.id} took the heartbeat's QMP connection`);
        refusalSaid = false;
        c.heartbeat = hb;
        hb.on('event', (ev) => this.watchGuestShutdown(c, ev));
      }
      try {
        const st = await hb.execute<{ status?: string }>('query-status', {}, { timeoutMs });
        answered();
        crashedFor(st.status === 'guest-panicked');
      } catch (err) {
        if (!live()) return;
        if (err instanceof TimeoutError) {
          unanswered(sent, true);
          continue; // ask again at once: the next reply tells when it is back
        }
        // The connection went away: a dying child closes it before its exit is seen (its exit
        // ends this loop), a living one had it dropped. Make it again; until then, it does not answer.
        log.debug(`vm${c.id}: heartbeat connection lost: ${errorMessage(err)}`);
        void hb.close().catch(() => undefined);
        if (c.heartbeat === hb) c.heartbeat = null;
        unanswered(sent, false);
      }
      await new Promise<void>((resolve) => this.later(limits.upHeartbeatIntervalMs, resolve));
    }
  }

  /**
   * With the heartbeat off (--heartbeat-timeout 0): the heartbeat's second QMP connection to
   * `c` all the same, on which nothing is asked and nothing judged. A guest's SHUTDOWN is sent
   * once, to the clients connected then: while the driver's connection is being made again
   * (limits.upChildExitGraceMs at least) it would be heard by no one, and the guest's end taken
   * for a death (a failover whose survivor's guest exits too: 'pair: failed', status 1). Made
   * again every limits.upHeartbeatIntervalMs after it goes away, for as long as `c` lives.
   */
  private async listenOnly(c: Child): Promise<void> {
    const live = (): boolean => !c.exited && !this.finished;
    while (live()) {
      let q = c.heartbeat;
      if (q === null || q.closed) {
        try {
          q = await QmpClient.connect(`unix:${c.qmpPath}`, { oob: false, eventLogMax: 0 });
        } catch (err) {
          if (!live()) return;
          log.debug(`vm${c.id}: no second QMP connection for its events: ${errorMessage(err)}`);
          await new Promise<void>((resolve) => this.later(limits.upHeartbeatIntervalMs, resolve));
          continue;
        }
        if (!live()) {
          void q.close().catch(() => undefined);
          return;
        }
        c.heartbeat = q;
        q.on('event', (ev) => this.watchGuestShutdown(c, ev));
      }
      const open = q;
      await new Promise<void>((resolve) => {
        if (open.closed) resolve();
        else open.on('close', () => resolve());
      });
      if (c.heartbeat === open) c.heartbeat = null;
      if (live()) await new Promise<void>((resolve) => this.later(limits.upHeartbeatIntervalMs, resolve));
    }
  }

  /** Whether `c`'s process exits within `ms`. */
  private exitWithin(c: Child, ms: number): Promise<boolean> {
    if (c.exited) return Promise.resolve(true);
    return new Promise((resolve) => {
      const onExit = (): void => {
        clearTimeout(t);
        this.timers.delete(t);
        resolve(true);
      };
      const t = this.later(ms, () => {
        c.exitListeners.delete(onExit);
        resolve(c.exited);
      });
      c.exitListeners.add(onExit);
    });
  }

  /** setTimeout that the supervisor clears when it exits. */
  private later(ms: number, fn: () => void): NodeJS.Timeout {
    const t = setTimeout(() => {
      this.timers.delete(t);
      fn();
    }, ms);
    this.timers.add(t);
    return t;
  }

  /** Capabilities and parameters for COLO (the primary also gets x-checkpoint-delay). */
  private async configure(qmp: QmpClient, primary: boolean): Promise<void> {
    const caps = [{ capability: 'x-colo', state: true }, { capability: 'multifd', state: this.o.channels !== null }];
    await qmp.execute('migrate-set-capabilities', { capabilities: caps });
    const params: Record<string, number> = {};
    if (this.o.channels !== null) params['multifd-channels'] = this.o.channels;
    if (primary) params['x-checkpoint-delay'] = this.o.checkpointDelayMs;
    if (Object.keys(params).length > 0) await qmp.execute('migrate-set-parameters', params);
  }

  private async protect(p: Child, s: Child): Promise<void> {
    const pq = await this.control(p, limits.qmpTimeoutMsDefault);
    const sq = await this.control(s, limits.qmpTimeoutMsDefault);
    // A deadline on progress, not on the whole migration: it carries all of RAM and the disk,
    // and a large --drive takes longer than any fixed bound (it never got protected).
    const timeoutMs = this.o.protectTimeoutMs;
    let deadline = Date.now() + timeoutMs;
    let transferred = -1;
    await this.configure(pq, true);
    const sMark = sq.eventCount;
    const pMark = pq.eventCount;
    await sq.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
    const info = await sq.execute<{ 'socket-address'?: { port: string }[] }>('query-migrate');
    const port = Number(info['socket-address']?.[0]?.port);
    if (!Number.isInteger(port) || port <= 0) throw new PairError('NO_INCOMING_PORT', `vm${s.id}: query-migrate shows no listening port: ${JSON.stringify(info)}`);
    try {
      await pq.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
      for (;;) {
        const r = await pq.execute<{ status?: string; 'error-desc'?: string; ram?: { transferred?: number } }>('query-migrate');
        if (r.status === 'colo') break;
        // It reached COLO and left it already, between two questions (its guest crashed, its
        // link broke): the protection happened, and its secondary may hold the only good state.
        // The core acts on what ended it (the crash or COLO_EXIT it saw meanwhile) once it is
        // told the pair is protected; a failed attempt would kill that secondary.
        if (r.status === 'completed' && pq.events.some((ev) => ev.index >= pMark && ev.event === 'MIGRATION' && ev.data.status === 'colo')) break;
        if (r.status === 'failed' || r.status === 'cancelled' || r.status === 'completed') {
          throw new PairError('PROTECT_FAILED', `the migration into vm${s.id} ended in ${r.status}${r['error-desc'] !== undefined ? `: ${r['error-desc']}` : ''}`);
        }
        const now = r.ram?.transferred ?? 0;
        if (now !== transferred) {
          transferred = now;
          deadline = Date.now() + timeoutMs;
        } else if (Date.now() > deadline) {
          throw new PairError('PROTECT_TIMEOUT', `the migration into vm${s.id} moved nothing for ${timeoutMs} ms (status ${r.status ?? 'none'}, ${transferred} bytes sent)`);
        }
        await new Promise((r2) => setTimeout(r2, 50));
      }
      await sq.waitEvent('MIGRATION', { after: sMark, where: (ev) => ev.data.status === 'colo', timeoutMs });
    } catch (err) {
      // Leave the primary running alone: cancel what is left of the migration.
      if (!p.exited && !pq.closed) {
        // A primary that reached COLO refuses migrate_cancel: it goes on alone instead.
        await pq.execute('migrate_cancel').catch(async (e: unknown) => {
          if (e instanceof QmpCommandError && /COLO/.test(e.message)) await pq.execute('x-colo-lost-heartbeat').catch(() => undefined);
        });
        await this.waitSettled(pq).catch(() => undefined);
      }
      throw err;
    }
  }

  private async waitSettled(pq: QmpClient): Promise<void> {
    const deadline = Date.now() + limits.upFailoverTimeoutMs;
    for (;;) {
      const r = await pq.execute<{ status?: string }>('query-migrate');
      const st = r.status ?? 'none';
      if (st === 'none' || st === 'failed' || st === 'cancelled' || st === 'completed') return;
      if (Date.now() > deadline) throw new PairError('CANCEL_TIMEOUT', `migration status still ${st} after migrate_cancel`);
      await new Promise((r2) => setTimeout(r2, 50));
    }
  }

  /**
   * x-colo-lost-heartbeat on the survivor; resolves once it left COLO (COLO_EXIT).
   *
   * A survivor that does not answer (stopped, starved) is the only copy of the service: as the
   * core does not fence it (up-core.ts fence), it is asked again until it answers or dies, not
   * given up on after upFailoverTimeoutMs, which would end the service for a stall. Said again
   * while its failover runs, the command is accepted and changes nothing; once that is done it
   * is refused, and query-colo-status tells that this node left COLO.
   *
   * `withinMs`: no more asking after that long (adopt: the children are not this supervisor's
   * yet, and a run of colo up that hangs before it says anything helps nobody); the stall is
   * then a PairError ADOPT_FAILOVER_TIMEOUT.
   */
  private async lostHeartbeat(c: Child, mode: Role, withinMs?: number): Promise<void> {
    const deadline = withinMs === undefined ? Infinity : performance.now() + withinMs;
    /** Whether to ask again after no answer; throws once past the deadline. */
    const askAgain = (): boolean => {
      if (c.exited) return false;
      if (performance.now() < deadline) return true;
      throw new PairError('ADOPT_FAILOVER_TIMEOUT', `vm${c.id} (pid ${c.pid}) has not carried out x-colo-lost-heartbeat for ${withinMs} ms (stopped, or hung?)`);
    };
    let q = await this.control(c);
    let mark = q.eventCount;
    // A secondary that left COLO with reason error did not take over (its takeover broke off,
    // or its apply did before): it serves nothing, whatever its exit from COLO says. A primary
    // leaves with reason error also when it went on alone by itself (its link broke): whether
    // its guest runs tells a failover that could not run it (colo/core.ts resumeFailed).
    const checkReason = async (reason: unknown): Promise<void> => {
      if (reason !== 'error') return;
      if (mode === 'secondary') {
        throw new PairError('TAKEOVER_FAILED', `vm${c.id} (pid ${c.pid}) left COLO with reason error: it did not take over (its log says why)`);
      }
      const run = await q.execute<{ status?: string }>('query-status', {}, { timeoutMs: limits.upFailoverTimeoutMs });
      if (guestDead(run.status)) {
        throw new PairError('FAILOVER_FAILED', `vm${c.id} (pid ${c.pid}) left COLO with reason error and its guest does not run (state ${run.status}): it could not go on alone (its log says why)`);
      }
    };
    const left = async (): Promise<boolean> => {
      const st = await q.execute<{ mode?: string; 'last-mode'?: string; reason?: string }>('query-colo-status', {}, { timeoutMs: limits.upFailoverTimeoutMs });
      if (st.mode !== 'none' || st['last-mode'] !== mode) return false;
      await checkReason(st.reason);
      return true;
    };
    // The connection closed under a command while `c` lives (it dropped the supervisor): go on
    // on a new one. A COLO_EXIT sent meanwhile is lost: whether it left COLO is asked instead.
    const reconnected = async (err: unknown): Promise<boolean> => {
      if (!(err instanceof ChannelClosedError) || c.exited) return false;
      const again = await this.reconnectControl(c);
      if (again === null) return false;
      q = again;
      mark = q.eventCount;
      return true;
    };
    for (;;) {
      try {
        await q.execute('x-colo-lost-heartbeat', {}, { oob: q.oobEnabled, timeoutMs: limits.upFailoverTimeoutMs });
      } catch (err) {
        if (err instanceof TimeoutError && askAgain()) continue; // no answer: ask again
        if (await reconnected(err)) {
          if (await left().catch(() => false)) return;
          continue;
        }
        // A primary whose channel broke leaves COLO by itself (reason error).
        if (!(err instanceof QmpCommandError && /not in COLO mode/.test(err.message))) throw err;
        if (await left()) return;
        throw err;
      }
      try {
        const exit = await q.waitEvent('COLO_EXIT', { after: mark, timeoutMs: limits.upFailoverTimeoutMs });
        await checkReason(exit.data?.reason);
        return;
      } catch (err) {
        if (await reconnected(err)) {
          if (await left().catch(() => false)) return;
          continue;
        }
        if (!(err instanceof TimeoutError) || c.exited) throw err;
        // It accepted, but has not left COLO: stalled since (ask again), or a failover that
        // does not end on a node that answers (give up).
        try {
          if (await left()) return;
        } catch (probe) {
          if (probe instanceof TimeoutError && askAgain()) continue;
          if (await reconnected(probe)) continue;
          throw probe;
        }
        throw err;
      }
    }
  }

  /**
   * At the end, the disk of the node that served last becomes the --drive image again (after a
   * failover it is one of the supervisor's copies); the other copies go.
   */
  private keepDisk(primary: number | null): void {
    const drive = this.o.drive;
    if (drive === null) return;
    const p = primary === null ? undefined : this.children.get(primary);
    if (p?.disk != null && p.disk !== drive) {
      if (fs.existsSync(p.disk)) {
        // The drive's own VM (vm1) is gone: another process may have opened the image since
        // (its lock was free). Copying over it would corrupt that VM's disk: keep the copy.
        let lock: ImageLock | null = null;
        try {
          lock = lockImage(drive, 'write');
          copyImage(p.disk, drive);
          log.info(`the disk of vm${p.id} (the last primary) is now ${drive}`);
        } catch (err) {
          // The drive may now be cut short (a full filesystem): the copy is the only whole
          // disk, with every acknowledged write, so it stays, and so does the state folder.
          this.keptDisk = p.disk;
          log.error(`could not copy the last primary's disk to ${drive}: ${errorMessage(err)}; it stays at ${p.disk}`);
          return;
        } finally {
          lock?.release();
        }
      } else {
        // Its image went with it (a double failure): say that the drive is older, not nothing.
        log.warn(`the disk of vm${p.id} (the last primary) is gone with it: ${drive} keeps an older state`);
      }
    }
    try {
      for (const c of this.children.values()) if (c.ownDisk && c.disk !== null) fs.rmSync(c.disk, { force: true });
    } catch (err) {
      log.warn(`could not remove the secondaries' disk copies: ${errorMessage(err)}`);
    }
  }

  /** SIGKILL every child still running (the supervisor itself is going away). */
  killAll(): void {
    for (const c of this.children.values()) signalChild(c, 'SIGKILL');
  }
}

/**
 * The service address must be free: the primary opens it only after it started, and a
 * secondary when it takes over, so a pair started on a taken address would look protected and
 * serve nothing.
 */
async function checkAddressFree(host: string, port: number): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const server = net.createServer();
    server.once('error', (err: NodeJS.ErrnoException) => {
      const why = err.code === 'EADDRINUSE' ? 'it is in use (another service, or a colo up still running?)' : err.message;
      reject(new UsageError('BAD_OPTION', `--net listen=${formatListen({ host, port })}: cannot listen there: ${why}`));
    });
    server.listen({ host, port, exclusive: true }, () => server.close(() => resolve()));
  });
}

/** What prepareStateDir found: the folder, and the children of a colo up that died there (to adopt). */
interface StateDir {
  dir: string;
  /** `pid`: its process, when found by its command line (else its pid file tells). */
  live: { id: number; qmpPath: string; pid: number | null }[];
  /** Above every vmN file the folder holds: new children never reuse a name. */
  nextId: number;
}

/** The supervisor's own pid file in its state folder: one colo up per folder. */
const supervisorPidFile = 'up.pid';

/**
 * The state folder: made (a new one under the system's temporary directory by default) and
 * checked before any child starts. A folder that cannot be made or written is refused with the
 * reason (it was an internal error with a stack trace, or a primary that died at start). So is
 * one that another living colo up supervises (its up.pid).
 *
 * A --state-dir where children of an earlier colo up still answer on their QMP sockets is that
 * supervisor's, dead (SIGKILLed, crashed): its children are adopted (UpDriver.adopt), so that
 * running the same colo up again restores the automatic failover without stopping the
 * service. Without such children, a folder that holds a disk image of an earlier run
 * (`vmN.img`) is refused: each new secondary's image is made empty there, and a leftover one
 * may be the only copy of the newest disk (the copy back to --drive failed, or the supervisor
 * was killed after a failover).
 */
async function prepareStateDir(dir: string | null, drive: string | null): Promise<StateDir> {
  const what = dir === null ? `a state folder under ${os.tmpdir()}` : `--state-dir ${dir}`;
  let made: string;
  let entries: string[];
  try {
    if (dir === null) {
      made = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-up-'));
    } else {
      fs.mkdirSync(dir, { recursive: true });
      made = dir;
    }
    fs.accessSync(made, fs.constants.W_OK | fs.constants.X_OK);
    entries = fs.readdirSync(made);
  } catch (err) {
    throw new UsageError('STATE_DIR', `${what}: cannot use it: ${errorMessage(err)}`);
  }
  lockStateDir(made, what);
  try {
    // Read again: a colo up that held the folder until now may have changed it.
    return await inspectStateDir(made, what, fs.readdirSync(made), drive);
  } catch (err) {
    fs.rmSync(path.join(made, supervisorPidFile), { force: true });
    throw err;
  }
}

/**
 * Makes `dir` this supervisor's: its up.pid, created only where there is none (two colo up
 * started at once on one folder: one goes on, the other is refused), before the folder is
 * looked at. One of a colo up that died is taken away first; of two supervisors that both
 * found it stale, the one whose rename fails looks again and finds the other's.
 */
function lockStateDir(dir: string, what: string): void {
  const file = path.join(dir, supervisorPidFile);
  const mine = `${file}.${process.pid}`;
  const refuse = (pid: number | null): never => {
    throw new UsageError('STATE_DIR', `${what}: colo up ${pid ?? '(starting)'} supervises the pair there`);
  };
  try {
    // Made whole, then linked: a reader never sees an empty up.pid (it would take it for stale).
    // With its start time: a pid the system gave again to another colo up is not this one.
    fs.writeFileSync(mine, `${[process.pid, procStat(process.pid)?.startTime ?? null].filter((v) => v !== null).join(' ')}\n`);
    for (let attempt = 0; ; attempt++) {
      try {
        fs.linkSync(mine, file);
        return;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || attempt >= 3) throw err;
      }
      let held: string;
      try {
        held = fs.readFileSync(file, 'utf8');
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
        throw err;
      }
      const [pidText, started] = held.trim().split(/\s+/);
      const pid = Number(pidText);
      const valid = Number.isSafeInteger(pid) && pid > 0;
      // Without a start time (no /proc, or an up.pid of an older colo up) the pid alone tells.
      const startedNow = procStat(pid)?.startTime ?? null;
      const same = started === undefined || startedNow === null || startedNow === started;
      if (valid && pid !== process.pid && pidAlive(pid) && same && isColoUp(pid)) refuse(pid);
      // Stale: the up.pid of a colo up that died.
      const stale = `${file}.stale.${process.pid}`;
      try {
        fs.renameSync(file, stale);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
        throw err;
      }
      const took = fs.readFileSync(stale, 'utf8');
      if (took !== held) {
        // A colo up that started meanwhile made it: given back, and this one refused.
        try {
          fs.linkSync(stale, file);
        } catch {
          // a third one holds the folder now
        }
        fs.rmSync(stale, { force: true });
        const other = Number(took.trim().split(/\s+/)[0]);
        refuse(Number.isSafeInteger(other) && other > 0 ? other : null);
      }
      fs.rmSync(stale, { force: true });
    }
  } catch (err) {
    if (err instanceof UsageError) throw err;
    throw new UsageError('STATE_DIR', `${what}: cannot make its ${supervisorPidFile}: ${errorMessage(err)}`);
  } finally {
    fs.rmSync(mine, { force: true });
  }
}

/** prepareStateDir, once the folder is this supervisor's. */
async function inspectStateDir(made: string, what: string, entries: string[], drive: string | null): Promise<StateDir> {
  const images = entries.filter((f) => /^vm\d+\.img$/.test(f)).sort();
  if (drive !== null && images.some((f) => path.join(made, f) === drive)) {
    throw new UsageError('STATE_DIR', `--drive ${drive} is in ${what} under a name colo up gives the secondaries' disks (vmN.img): a secondary's empty image would replace it; rename it`);
  }
  const live: StateDir['live'] = [];
  const answers = (socketPath: string): Promise<boolean> =>
    new Promise<boolean>((resolve) => {
      const sock = net.connect(socketPath, () => {
        sock.destroy();
        resolve(true);
      });
      sock.once('error', () => resolve(false));
      sock.setTimeout(limits.qmpTimeoutMsDefault, () => {
        sock.destroy();
        resolve(false);
      });
    });
  // A child is known by its socket, or by its process: one the dead supervisor had just
  // started (a secondary it was re-protecting with, the pair it was starting) has no socket
  // that answers yet, maybe no pid file. Taken for absent, it would boot on unsupervised.
  const running = childrenIn(made);
  const childIds = [...new Set([...entries.flatMap((e) => /^vm(\d+)\.qmp$/.exec(e)?.[1] ?? []).map(Number), ...running.keys()])].sort((x, y) => x - y);
  for (const id of childIds) {
    const socketPath = path.join(made, `vm${id}.qmp`);
    const pid = running.get(id);
    if (pid === undefined) {
      if (await answers(socketPath)) live.push({ id, qmpPath: socketPath, pid: null });
      continue;
    }
    const deadline = Date.now() + limits.upChildStartTimeoutMs;
    for (;;) {
      if (await answers(socketPath)) {
        live.push({ id, qmpPath: socketPath, pid });
        break;
      }
      if (!pidAlive(pid)) break;
      if (Date.now() > deadline) {
        throw new UsageError('STATE_DIR', `${what}: vm${id} (pid ${pid}), started by the colo up that ran there, has not answered on its QMP socket for ${limits.upChildStartTimeoutMs} ms; it is left running`);
      }
      await new Promise((r) => setTimeout(r, limits.upAdoptedExitPollMs));
    }
  }
  if (live.length === 0 && images.length > 0) {
    throw new UsageError(
      'STATE_DIR',
      `${what} holds the disk image${images.length > 1 ? 's' : ''} of an earlier colo up (${images.join(', ')}): one may be the newest copy of the guest's disk (a copy back to --drive that failed, or a colo up that was killed); move ${images.length > 1 ? 'them' : 'it'} away first`,
    );
  }
  const ids = entries.flatMap((e) => /^vm(\d+)\./.exec(e)?.[1] ?? []).map(Number);
  return { dir: made, live, nextId: Math.max(0, ...ids, ...running.keys()) + 1 };
}

/**
 * The `colo run` processes whose QMP socket is in `dir` (children of a colo up there, also
 * ones it had only just started), by node id (vmN): found by their command lines, as a child
 * killed with its supervisor before its pid file was written has none. Empty without /proc.
 */
function childrenIn(dir: string): Map<number, number> {
  const found = new Map<number, number>();
  let procs: string[];
  try {
    procs = fs.readdirSync('/proc').filter((e) => /^\d+$/.test(e) && Number(e) !== process.pid);
  } catch {
    return found;
  }
  for (const e of procs) {
    const argv = commandLine(Number(e)); // null: gone meanwhile
    if (argv === null) continue;
    const i = argv.indexOf('--qmp');
    const m = i > 0 && argv.includes('run') ? /^unix:(.*)\/vm(\d+)\.qmp$/.exec(argv[i + 1] ?? '') : null;
    if (m !== null && m[1] === dir) found.set(Number(m[2]), Number(e));
  }
  return found;
}

/** Whether process `pid` is a colo up (its command line), not an unrelated one that reused the pid. */
function isColoUp(pid: number): boolean {
  return commandLine(pid)?.includes('up') ?? false;
}

/** The command line of process `pid` (/proc), or null when it cannot be read (gone, no /proc). */
function commandLine(pid: number): string[] | null {
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  } catch {
    return null;
  }
}

/** The signals that stop the pair (the children first, then the supervisor). */
const stopSignals: readonly NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

export async function upCommand(argv: string[]): Promise<number> {
  const o = parseUpArgs(argv);
  setLogNode('up');
  if (!fs.existsSync(o.guestPath)) throw new UsageError('BAD_OPTION', `'${o.guestPath}' does not exist`);
  // Refuse a bad guest once, here, rather than as two children that die at start.
  checkGuest(fs.readFileSync(o.guestPath));
  const state = await prepareStateDir(o.stateDir, o.drive);
  const stateDir = state.dir;
  const driver = new UpDriver(o, stateDir);
  const onSignal = (sig: NodeJS.Signals): void => driver.dispatch({ type: 'signal', signal: sig });
  // SIGHUP too: the terminal or ssh session closing sends it to the supervisor only (the
  // children have their own process group), and Node's default would end the supervisor
  // without its 'exit' handler, leaving both children to run on, holding the address.
  for (const sig of stopSignals) process.on(sig, onSignal);
  // Left on after the supervisor finished: a write that fails late must not change its exit status.
  process.stdout.on('error', (err: Error) => driver.stdoutFailed(err));
  const onExit = (): void => driver.killAll();
  process.on('exit', onExit);
  // Made by prepareStateDir: the folder is this supervisor's from before it was looked at.
  const pidPath = path.join(stateDir, supervisorPidFile);
  try {
    try {
      // Adopted children serve on the address already.
      if (state.live.length === 0) await checkAddressFree(o.net.host, o.net.port);
      if (state.live.length > 0) await driver.adopt(state.live, state.nextId);
      else driver.dispatch({ type: 'start' });
    } catch (err) {
      fs.rmSync(pidPath, { force: true });
      throw err;
    }
    const code = await driver.done;
    fs.rmSync(pidPath, { force: true });
    if (o.stateDir === null && driver.keptDisk === null) fs.rmSync(stateDir, { recursive: true, force: true });
    return code;
  } finally {
    for (const sig of stopSignals) process.off(sig, onSignal);
    process.off('exit', onExit);
  }
}
