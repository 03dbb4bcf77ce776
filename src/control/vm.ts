import fs from 'node:fs';
import { EventEmitter } from 'node:events';
import { ChannelClosedError, ColoError, ImageLockError, MigrationError, QmpCommandError, UsageError, errorMessage } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { logger } from '../core/log.js';
import { loadGuest } from '../machine/instrument.js';
import { Machine, type IoErrorReport, type RunState } from '../machine/machine.js';
import { FrontEnd, formatListen } from '../net/frontend.js';
import type { InputCredit, NicInput, NicOutput } from '../net/nic.js';
import type { RunOptions } from '../cli/options.js';
import { loadMachineFromFile } from '../migration/file.js';
import { MigrationControl } from './migration-control.js';
import { ColoController } from '../colo/controller.js';

const log = logger('vm');

export type { MigrationStatus } from '../migration/status.js';

/**
 * One VM process: the machine, its network front end, and the state QMP reports. Emits
 * 'qmp-event' (name, data) for every QMP event and 'quit' when the process should exit.
 */
export class Vm extends EventEmitter {
  frontEnd: FrontEnd | null = null;
  /**
   * The front end a switchover closed with its last replies still going out to slow clients
   * (FrontEnd.close's drainClosed): at exit they are reset, not waited for.
   */
  drainingFrontEnd: FrontEnd | null = null;
  /** Migration settings, the current or last migration, query-migrate (migration-control.ts). */
  readonly migration: MigrationControl;
  /** COLO (colo/): hooks into the migration, failover, query-colo-status. */
  readonly colo: ColoController;
  /**
   * Where guest output goes: null = the front end (its clients). COLO routes it through the
   * compare on the primary and back to the primary on the secondary (colo/network.ts).
   */
  outputSink: ((out: NicOutput) => void) | null = null;
  /** Sees every client input event after the guest got it (COLO's mirror on the primary). */
  inputTap: ((ev: NicInput) => void) | null = null;
  /**
   * COLO start: the input numbered from the switchover pause of the initial migration on,
   * until the mirror takes over the tap (PrimaryNet.start). Some of it is after the state's
   * last save (a client that connects or resets meanwhile): the secondary must get it too.
   */
  inputBacklog: NicInput[] | null = null;
  /**
   * QEMU's autostart: run the guest once it is ready (booted, or its incoming migration done).
   * Off with -S, and turned off by `stop` while the VM waits for an incoming migration.
   */
  autostart: boolean;
  private quitting = false;
  /** quit was called: the process is going away. */
  get exiting(): boolean {
    return this.quitting;
  }
  /** The tail of the run-state operations (runStateOp). */
  private runStateTail: Promise<unknown> = Promise.resolve();
  /** A takeover's front end waiting for its address to be free (startFrontEnd untilFree), and its timer. */
  private listenRetry: NodeJS.Timeout | null = null;
  private retryingFrontEnd: FrontEnd | null = null;
  /** Since when guest disk writes find the host filesystem full (null: they do not). */
  private diskFullSince: number | null = null;
  /** Disk errors reported to the guest (action report): when one was last logged, and how many since. */
  private diskErrorLoggedAt: number | null = null;
  private diskErrorsUnlogged = 0;

  private constructor(readonly opts: RunOptions, readonly machine: Machine) {
    super();
    this.autostart = !opts.startPaused;
    this.migration = new MigrationControl(this);
    this.colo = new ColoController(this);
    machine.on('stop', () => this.event('STOP'));
    machine.on('resume', () => this.event('RESUME'));
    machine.on('io-error', (r: IoErrorReport) => this.onIoError(r));
    machine.on('io-resumed', () => {
      if (this.diskFullSince === null) return;
      log.info(`the guest's disk write went through after ${Date.now() - this.diskFullSince} ms; the guest runs on`);
      this.diskFullSince = null;
    });
    machine.on('output', (out: NicOutput) => {
      if (this.outputSink !== null) this.outputSink(out);
      else this.frontEnd?.deliver(out);
    });
    machine.on('credit', (c: InputCredit) => this.frontEnd?.credit(c.conn, c.bytes));
    machine.on('listener-closed', () => this.onGuestListenerClosed());
    machine.on('shutdown', (code: number) => {
      log.info(`guest exited with code ${code}`);
      // Under COLO its last output may still wait for the other guest's copy (colo/driver.ts).
      // Whatever that wait meets, the process ends: a guest's exit never leaves it running.
      void Promise.resolve()
        .then(() => this.colo.guestExited())
        .catch((err: unknown) => log.warn(`the guest's last output under COLO: ${errorMessage(err)}`))
        .finally(() => this.quit(code, { guest: true, reason: 'guest-shutdown', 'exit-code': code }));
    });
    machine.on('panicked', (message: string) => {
      // A COLO secondary's crash is not the service's: the primary's checkpoint replaces it
      // (colo/core.ts says so, once for a streak of them).
      if (this.colo.secondaryInColo) log.debug(`guest crashed: ${message}`);
      else log.error(`guest crashed: ${message}`);
      this.event('GUEST_PANICKED', { action: 'pause', info: { type: 'wasm-trap', message } });
    });
  }

  static async create(opts: RunOptions): Promise<Vm> {
    // The store log is the default dirty tracker: migration and checkpoints find dirty pages in
    // O(dirty) and skip never-written memory; it costs the guest some speed on store-heavy
    // loops (docs/benchmarks.md, "Migration"). --dirty-log shadow turns it off.
    const guest = await loadGuest(opts.guestPath, { storeLog: opts.storeLog ?? true });
    const machine = await Machine.create({
      guest,
      memoryBytesMax: opts.memoryBytes,
      args: [opts.name ?? opts.guestPath.replace(/^.*\//, '').replace(/\.wasm$/, ''), ...opts.guestArgs],
      env: [],
      serial: opts.serial,
      // QEMU's -incoming: the image is inactive, unlocked, until the migration activates it.
      // A state loaded from a file has no source to hand the image over: locked at once.
      drive: opts.drive === null ? null : { ...opts.drive, lock: opts.incoming === null || opts.incoming.startsWith('file:') ? 'now' : 'deferred' },
    });
    return new Vm(opts, machine);
  }

  get runState(): RunState {
    return this.machine.runState;
  }

  event(name: string, data?: Record<string, unknown>): void {
    this.emit('qmp-event', name, data);
  }

  /** Boot: restore from a file if asked, bring the NIC up, run unless -S. */
  async boot(): Promise<void> {
    const inc = this.opts.incoming;
    if (inc !== null && inc.startsWith('file:')) {
      this.machine.setRunState('inmigrate');
      await loadMachineFromFile(this.machine, inc.slice(5));
      log.info(`machine restored from ${inc.slice(5)}`);
      this.machine.setRunState('paused');
    } else if (inc !== null) {
      // The machine waits, never started, for the whole stream (migration/destination.ts).
      this.machine.setRunState('inmigrate');
      if (inc.startsWith('tcp:')) await this.migration.startIncoming(inc);
    }
    if (inc === null || inc.startsWith('file:')) {
      await this.startFrontEnd({ firstOwner: true });
      if (this.autostart) await this.machine.cont();
    }
  }

  /**
   * Listen on the --net address and attach it to the guest NIC. With `untilFree` (a COLO
   * secondary taking over, or a migration destination after the source's `go`: either holds
   * the only copy of the guest), an address that cannot be listened on after the short retry
   * (still in use, or any other refusal) does not fail: the guest runs on and the front end
   * keeps trying in the background, every limits.netTakeoverListenRetryMs, until it listens or
   * the VM goes. QEMU's destination likewise never fails a completed migration for a NIC backend.
   * With `firstOwner` (boot) nobody hands the address over: one in use is taken, and that is
   * said at once, as QEMU does, not after the short retry that waits for a previous owner.
   */
  async startFrontEnd(opts: { untilFree?: boolean; firstOwner?: boolean } = {}): Promise<void> {
    if (this.opts.net === null || this.frontEnd !== null || this.listenRetry !== null) return;
    // The NIC state (numbering, known connections) is read from a stopped vCPU; a guest that
    // is already running (a COLO secondary taking over) is stopped for that moment.
    const wasRunning = this.machine.running;
    if (wasRunning) await this.machine.pause('paused');
    const state = await this.machine.saveVcpu();
    if (wasRunning) await this.machine.cont();
    // The tap (COLO's mirror) sees the event first: both flush at setImmediate, in the order
    // they were scheduled, so the mirror leaves for the secondary before the PVM's vCPU is woken.
    // Woken first, the vCPU (on the same core) ran its whole batch before the mirror was sent,
    // and every reply then waited that much longer for the SVM's copy (docs/benchmarks.md).
    const fe = new FrontEnd(this.opts.net, (ev) => {
      this.inputTap?.(ev);
      this.machine.injectInput(ev);
    }, { seq: state.nic.lastSeq, conn: maxConn(state) });
    // Connections the guest knows belong to a front end that no longer exists: the guest
    // sees them reset.
    for (const c of state.nic.conns) fe.resetGuestConnection(c.conn);
    for (const ev of state.nic.pending) if (ev.kind === 'open') fe.resetGuestConnection(ev.conn);
    const where = formatListen(this.opts.net);
    if (state.nic.listening === false) {
      // The guest closed its listening socket before (on this node, or on the one whose state
      // this is): it accepts nothing, so nothing listens; a client is refused as by a real server.
      fe.stopListening();
      this.frontEnd = fe;
      log.info(`the guest closed its listening socket: not listening on ${where}`);
      return;
    }
    try {
      if (opts.firstOwner === true) await fe.listen();
      else await listenWithRetry(fe, () => this.quitting);
    } catch (err) {
      if (this.quitting || opts.untilFree !== true || !(err instanceof UsageError && err.code === 'NET_LISTEN')) throw err;
      const until = addressInUse(err) ? 'until the address is free' : 'until it can listen';
      log.warn(`${errorMessage(err)}; the guest runs on, and the front end tries again every ${limits.netTakeoverListenRetryMs} ms ${until}`);
      this.retryListen(fe, where, errorMessage(err));
      return;
    }
    if (this.quitting) {
      // The process quit while this listened (the boot's start, a migration's resume):
      // destroy() found no front end to close, and this one would keep the process alive.
      await fe.close();
      throw new ChannelClosedError('the VM is quitting');
    }
    this.frontEnd = fe;
    log.info(`serving guest NIC on ${formatListen({ host: this.opts.net.host, port: fe.boundPort() })}`);
  }

  /**
   * The VM gives its address up (an outgoing migration's switchover) while its front end still
   * waits for it (startFrontEnd untilFree): the retries stop, or the migrated-away VM would take
   * the address from its destination once it is free.
   */
  stopListenRetry(): void {
    if (this.listenRetry === null) return;
    clearTimeout(this.listenRetry);
    this.listenRetry = null;
    this.retryingFrontEnd = null;
    log.info(`no longer waiting for the service address ${this.opts.net === null ? '' : formatListen(this.opts.net)}`);
  }

  /** `lastError`: what the last try said; a new reason is warned about once, not every retry. */
  private retryListen(fe: FrontEnd, where: string, lastError: string): void {
    this.retryingFrontEnd = fe;
    this.listenRetry = setTimeout(() => {
      fe.listen().then(
        () => {
          if (this.listenRetry === null) {
            // Destroyed meanwhile; or the guest closed its listener, and fe serves on unlistening.
            if (this.frontEnd !== fe) void fe.close();
            return;
          }
          this.listenRetry = null;
          this.retryingFrontEnd = null;
          this.frontEnd = fe;
          log.info(`serving guest NIC on ${where} (the address is free again)`);
        },
        (err: unknown) => {
          if (this.listenRetry === null) return; // destroyed meanwhile
          const message = errorMessage(err);
          if (message !== lastError && !addressInUse(err)) log.warn(`still cannot listen on ${where}: ${message}`);
          this.retryListen(fe, where, message);
        },
      );
    }, limits.netTakeoverListenRetryMs);
  }

  /**
   * The guest closed its listening socket (fd 3), for good: the front end stops listening (a
   * new client is refused). One that still waits for its address (a takeover's) stops waiting
   * and serves the connections it has.
   */
  private onGuestListenerClosed(): void {
    if (this.frontEnd !== null) {
      this.frontEnd.stopListening();
      return;
    }
    const fe = this.retryingFrontEnd;
    if (fe === null || this.listenRetry === null) return;
    clearTimeout(this.listenRetry);
    this.listenRetry = null;
    this.retryingFrontEnd = null;
    fe.stopListening();
    this.frontEnd = fe;
    log.info(`the guest closed its listening socket: no longer waiting for ${this.opts.net === null ? '' : formatListen(this.opts.net)}`);
  }

  /**
   * QEMU's werror=enospc: the guest waits inside the write (machine state io-error), which is
   * tried again every limits.diskFullRetryMs or at `cont`. One warning for the whole time the
   * filesystem is full; BLOCK_IO_ERROR for each report (one per stop of the guest). Any other
   * error (and every read error: rerror=report) reaches the guest as EIO: BLOCK_IO_ERROR with
   * action report for each, as QEMU's, and a rate-limited warning.
   */
  private onIoError(r: IoErrorReport): void {
    this.event('BLOCK_IO_ERROR', { device: 'drive0', 'node-name': 'drive0', operation: r.operation, action: r.action, nospace: r.nospace, reason: r.reason });
    if (r.action === 'report') {
      this.logDiskError(r);
      return;
    }
    if (this.diskFullSince !== null) {
      log.debug(`guest disk write still waiting for space: ${r.reason}`);
      return;
    }
    this.diskFullSince = Date.now();
    log.warn(
      `guest disk write failed: ${r.reason}; the guest is stopped in it (state io-error) and it is tried again every ${limits.diskFullRetryMs} ms or at cont`,
    );
  }

  /**
   * A disk error the guest was given (EIO): a warning, at most one per
   * limits.diskErrorLogIntervalMs (a guest may retry in a loop), counting the ones in between.
   */
  private logDiskError(r: IoErrorReport): void {
    const now = Date.now();
    if (this.diskErrorLoggedAt !== null && now - this.diskErrorLoggedAt < limits.diskErrorLogIntervalMs) {
      this.diskErrorsUnlogged++;
      log.debug(`guest disk ${r.operation} failed: ${r.reason}`);
      return;
    }
    const more = this.diskErrorsUnlogged > 0 ? ` (and ${this.diskErrorsUnlogged} more since the last warning)` : '';
    this.diskErrorLoggedAt = now;
    this.diskErrorsUnlogged = 0;
    log.warn(`guest disk ${r.operation} failed: ${r.reason}; the guest was given EIO and runs on${more}`);
  }

  /**
   * QEMU's qmp_stop: waiting for an incoming migration, only autostart is cleared (the VM stays
   * paused after it, as with -S); otherwise only a running vCPU is stopped. A VM that is not
   * running keeps its state: postmigrate, shutdown, guest-panicked, internal-error, finish-migrate
   * stay what they are, so `cont` and `migrate` go on refusing them. io-error is a running vCPU
   * (it waits inside the guest's write) and becomes paused, as before.
   */
  async stop(): Promise<void> {
    await this.runStateOp(async () => {
      if (this.incomingStartsIt()) {
        this.autostart = false;
        return;
      }
      if (!this.machine.running) return;
      await this.machine.pause('paused');
    });
  }

  /**
   * QEMU's qmp_cont. In COLO it runs between the checkpoints (ColoController.cont). During an outgoing migration too (QEMU allows `stop` and then `cont` in
   * its rounds): the guest runs again and the rounds send what it dirties. Waiting for or
   * loading an incoming migration (until the source's `go`), it only sets autostart, as
   * QEMU's in inmigrate: the guest runs once it arrives (if it ran on the source), the undoing
   * of a `stop` or -S there. Refused: stop-and-copy and the switchover (finish-migrate, QEMU's
   * "Migration is not finalized yet"), a VM that must not or cannot run again, and what
   * MigrationControl.refuseCont refuses (COLO).
   */
  async cont(): Promise<void> {
    await this.runStateOp(async () => {
      const s = this.machine.runState;
      if (s === 'finish-migrate') throw new QmpCommandError('GenericError', 'Migration is not finalized yet');
      if (this.incomingStartsIt()) {
        this.autostart = true;
        return;
      }
      if (s === 'postmigrate' || s === 'shutdown' || s === 'guest-panicked' || s === 'internal-error') {
        throw new QmpCommandError('GenericError', `the VM cannot run in state ${s}`);
      }
      const colo = this.colo.cont();
      if (colo !== null) return colo;
      this.migration.refuseCont();
      const disk = this.machine.disk;
      if (disk?.inactive === true) {
        try {
          disk.activate();
        } catch (err) {
          if (err instanceof ImageLockError) throw new QmpCommandError('GenericError', err.message);
          throw err;
        }
      }
      await this.machine.cont();
    });
  }

  /**
   * Take back the image's lock (write, or read in snapshot mode) that a migration onto the same image file let go
   * (Disk.inactivate); true if this VM holds its image (or has none to take back). The
   * destination may hold it still: it took it at its restore and lets it go once it sees the
   * abort or the channel close, a moment after this side's failure or cancel. So a held lock is
   * tried again every limits.diskLockHandbackRetryMs for up to limits.diskLockHandbackWaitMs;
   * still held then (another process keeps it): false, with one error line naming it.
   * `gone`: the VM is going away, stop trying.
   */
  async activateDisk(when: string, gone: () => boolean = () => false): Promise<boolean> {
    const disk = this.machine.disk;
    if (disk === null || !disk.inactive) return true;
    const deadline = performance.now() + limits.diskLockHandbackWaitMs;
    for (;;) {
      try {
        disk.activate();
        return true;
      } catch (err) {
        if (!(err instanceof ImageLockError)) throw err;
        if (gone()) return false;
        if (performance.now() >= deadline) {
          log.error(`the VM stays paused ${when}: ${err.message} [${err.code}] (tried for ${limits.diskLockHandbackWaitMs} ms; cont tries again)`);
          return false;
        }
      }
      await new Promise((r) => setTimeout(r, limits.diskLockHandbackRetryMs));
    }
  }

  /**
   * Until the incoming migration ends (its state loaded, waiting for the source's `go`, the run
   * state is already paused), the VM is the destination's to start: `stop` and `cont` only
   * clear or set autostart.
   */
  private incomingStartsIt(): boolean {
    const incoming = this.migration.incoming;
    return this.machine.runState === 'inmigrate' || (incoming !== null && !incoming.core.finished && !this.machine.running);
  }

  /**
   * Runs the run-state operations of the user (stop, cont) and of a migration (the pause of
   * stop-and-copy, the resume after a failed or cancelled one) one at a time. A `cont` whose
   * vCPU has not yet answered must not meet a switchover pause that found it stopped: the
   * pause would take the VM for a paused one (the destination would not run it) and the vCPU
   * would then run on through the last round and the device state.
   */
  runStateOp<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.runStateTail.then(fn);
    this.runStateTail = next.catch(() => undefined);
    return next;
  }

  /**
   * Guest memory [addr, addr+size) into a file (QMP pmemsave). Written straight from guest RAM,
   * limits.pmemsaveChunkBytes per write, with the writes off the main thread: no copy of the
   * range, and other QMP clients (and the VM's own work) go on meanwhile. The reply comes
   * once the file is complete. A running guest goes on writing its memory, as in QEMU.
   */
  async pmemsave(addr: number, size: number, filename: string): Promise<void> {
    const ramBytes = this.machine.ram().byteLength;
    if (addr < 0 || size < 0 || addr + size > ramBytes) {
      throw new QmpCommandError('GenericError', `Invalid addr 0x${addr.toString(16)}/size ${size} specified (guest RAM is ${ramBytes} bytes)`);
    }
    let file: fs.promises.FileHandle | null = null;
    try {
      file = await fs.promises.open(filename, 'w');
      let done = 0;
      while (done < size) {
        // A view fetched for each write: the guest may grow its memory between two writes
        // (memory never shrinks, so the range stays inside it).
        const chunk = this.machine.ram().subarray(addr + done, addr + Math.min(size, done + limits.pmemsaveChunkBytes));
        const { bytesWritten } = await file.write(chunk);
        // A short write goes on from where it ended; one that wrote nothing ends the loop.
        if (bytesWritten === 0) throw new Error(`a write of ${chunk.byteLength} bytes at offset ${done} wrote nothing`);
        done += bytesWritten;
      }
      await file.close();
      file = null;
    } catch (err) {
      throw new QmpCommandError('GenericError', `writing to file '${filename}' failed: ${errorMessage(err)}`);
    } finally {
      await file?.close().catch(() => undefined);
    }
  }

  /**
   * End the process with exit status `code`. `shutdown`: the data of QEMU's SHUTDOWN event,
   * sent first (once, by the first quit). A guest's own exit adds `exit-code` (ours: QEMU's
   * guests have no exit status), so that a supervisor knows it even if it never sees the
   * process's (colo up kills one that does not end in time).
   */
  quit(code = 0, shutdown?: { guest: boolean; reason: string; 'exit-code'?: number }): void {
    if (this.quitting) return;
    this.quitting = true;
    if (shutdown !== undefined) this.event('SHUTDOWN', shutdown);
    this.emit('quit', code);
  }

  async destroy(): Promise<void> {
    if (this.listenRetry !== null) clearTimeout(this.listenRetry);
    this.listenRetry = null;
    this.retryingFrontEnd = null;
    this.colo.close();
    await this.migration.close().catch((err: unknown) => log.debug(`closing the migration: ${errorMessage(err)}`));
    await this.frontEnd?.close();
    this.frontEnd = null;
    await this.drainingFrontEnd?.close();
    this.drainingFrontEnd = null;
    await this.machine.destroy();
  }
}

function maxConn(state: Awaited<ReturnType<Machine['saveVcpu']>>): number {
  let m = 0;
  for (const c of state.nic.conns) m = Math.max(m, c.conn);
  for (const e of state.nic.pending) m = Math.max(m, e.conn);
  return m;
}

function addressInUse(err: unknown): boolean {
  return err instanceof ColoError && /EADDRINUSE/.test(err.message);
}

/**
 * The previous owner of the address (a migration source) may still be closing it. `quitting`:
 * the VM is going away; the retries stop (they held the exit for up to their 5 s).
 */
async function listenWithRetry(fe: FrontEnd, quitting: () => boolean): Promise<void> {
  const deadline = Date.now() + 5000;
  for (;;) {
    try {
      await fe.listen();
      return;
    } catch (err) {
      if (Date.now() > deadline || !addressInUse(err) || quitting()) throw err;
      // A SIGKILLed primary on this host frees the address when the kernel reaps it, a few
      // ms to tens of ms later: retry often, the service is down meanwhile.
      await new Promise((r) => setTimeout(r, 5));
    }
  }
}

export { MigrationError };
