import { ChannelClosedError, QmpCommandError, errorMessage } from '../core/errors.js';
import { logger } from '../core/log.js';
import type { DirtyTracker } from '../machine/dirty.js';
import { saveMachineToFile } from '../migration/file.js';
import { IncomingMigration } from '../migration/destination.js';
import { MigrationSettings, type CapabilityName, type ParameterUpdate } from '../migration/params.js';
import type { IncomingSession, SourceSession } from '../migration/session.js';
import { OutgoingMigration, describeError } from '../migration/source.js';
import { MultifdReceiver, MultifdSender } from '../migration/multifd.js';
import { ShadowDirtyTracker } from '../machine/dirty.js';
import { limits } from '../core/limits.js';
import { busyStatuses, migrationInfo, newStats, type MigrationStats, type MigrationStatus } from '../migration/status.js';
import { parseAddress } from './address.js';
import type { Vm } from './vm.js';
import type { NicInput } from '../net/nic.js';

const log = logger('vm');

/** COLO's hooks into the migration engine (set by colo/ when it is built in). */
export interface ColoMigrationHooks {
  /** Source with x-colo: the destination loaded the initial state; take the session over. */
  onSourceHandoff?: (session: SourceSession, migration: OutgoingMigration) => void;
  /** Destination with x-colo: the initial state is loaded (VM not started); take the session over. */
  onDestinationHandoff?: (session: IncomingSession, migration: IncomingMigration) => void;
  /**
   * Destination with x-colo: the session of the initial migration was just created (nothing
   * received yet); COLO sets its page target so that the RAM cache fills while it runs.
   */
  onDestinationSession?: (session: IncomingSession) => void;
  /** yank {type: migration} while COLO owns the session: close its channels (false: not in COLO). */
  yank?: () => boolean;
  /** migrate-set-parameters changed x-checkpoint-delay: a primary in COLO applies it at once. */
  checkpointDelaySet?: () => void;
}

function tcpTarget(uri: string): { host: string; port: number } {
  const a = parseAddress(uri);
  if (a.kind !== 'tcp') throw new QmpCommandError('GenericError', `Invalid migration URI '${uri}' (expected tcp:HOST:PORT or file:PATH)`);
  return { host: a.host, port: a.port };
}

/**
 * The migration side of one VM process: settings, the current (or last) migration in either
 * direction, and what query-migrate shows. QMP handlers (commands.ts) call it.
 */
export class MigrationControl {
  readonly settings = new MigrationSettings();
  stats: MigrationStats | null = null;
  outgoing: OutgoingMigration | null = null;
  incoming: IncomingMigration | null = null;
  coloHooks: ColoMigrationHooks = {};
  private tracker: DirtyTracker | null = null;
  /**
   * Multifd sender threads kept ready while the capability is on, so that a migration does
   * not wait for thread start-up (≈50 ms per thread on the benchmark machine).
   */
  private senders: MultifdSender | null = null;
  /** --incoming defer: waiting for migrate-incoming. */
  private deferred: boolean;
  private exitOnError = true;
  /** close() ran: the VM is going away (no sender threads are started again). */
  private closed = false;
  /**
   * Cancelled migrations whose main channel may still be open in the background for their
   * abort frame (SourceSession.abort, up to limits.migrationAbortDeliveryMs). A later migration
   * replaces `outgoing`, so close() finds them here: an exit must not wait for them.
   */
  private readonly aborting = new Set<SourceSession>();

  constructor(private readonly vm: Vm) {
    this.deferred = vm.opts.incoming === 'defer';
  }

  /** The VM's dirty tracker (one for its lifetime: the store log's history lives in it). */
  dirtyTracker(): DirtyTracker {
    // Only a machine that booted fresh knows that a page the log never saw is untouched.
    this.tracker ??= this.vm.machine.dirtyTracker({ sinceBoot: this.vm.opts.incoming === null });
    return this.tracker;
  }

  get busy(): boolean {
    return this.stats !== null && busyStatuses.includes(this.stats.status);
  }

  private refuseIfBusy(): void {
    if (!this.busy) return;
    // A destination that only listens can still be configured (QEMU checks the outgoing side only).
    if (this.incoming !== null && this.incoming.session === null) return;
    throw new QmpCommandError('GenericError', "There's a migration process in progress");
  }

  // ---- settings ----

  setCapabilities(list: { capability: CapabilityName; state: boolean }[]): void {
    this.refuseIfBusy();
    this.settings.setCapabilities(list);
    this.refreshSenders();
  }

  setParameters(update: ParameterUpdate): void {
    this.settings.setParameters(update);
    if (update['downtime-limit'] !== undefined) this.outgoing?.setDowntimeLimit(update['downtime-limit']);
    if (update['max-bandwidth'] !== undefined) this.outgoing?.setBandwidth(this.settings.parameters['max-bandwidth']);
    if (update['multifd-channels'] !== undefined) this.refreshSenders();
    if (update['x-checkpoint-delay'] !== undefined) this.coloHooks.checkpointDelaySet?.();
  }

  /** Keep idle sender threads matching the settings (none when multifd is off or this VM cannot migrate out). */
  private refreshSenders(): void {
    // A migration that ends while the process quits must not start threads that keep it alive.
    if (this.closed) return;
    const want = this.settings.capabilities.multifd && this.vm.opts.incoming === null ? this.settings.parameters['multifd-channels'] : 0;
    const have = this.senders;
    if (have !== null && have.channels === want && have.failed === null) return;
    this.senders = null;
    if (have !== null) void have.destroy();
    if (want === 0 || this.busy) return;
    const tracker = this.dirtyTracker();
    const m = this.vm.machine;
    this.senders = MultifdSender.spawn({
      memory: m.memory,
      channels: want,
      pagesMax: (m.maximumPages * limits.wasmPageBytes) / limits.pageBytes,
      shadow: tracker instanceof ShadowDirtyTracker ? tracker.shadow : null,
    });
  }

  // ---- outgoing ----

  /** `migrate uri=...` */
  migrate(uri: string): void {
    this.refuseIfBusy();
    const s = this.vm.machine.runState;
    if (s === 'inmigrate' || s === 'postmigrate' || s === 'shutdown' || s === 'guest-panicked' || s === 'internal-error') {
      throw new QmpCommandError('GenericError', `cannot migrate a VM in state ${s}`);
    }
    if (uri.startsWith('file:') && uri.length > 5) {
      this.startFile(uri.slice(5));
      return;
    }
    if (!uri.startsWith('tcp:')) throw new QmpCommandError('GenericError', `Invalid migration URI '${uri}' (expected tcp:HOST:PORT or file:PATH)`);
    const target = tcpTarget(uri);
    const caps = this.settings.capabilities;
    const params = this.settings.parameters;
    const colo = caps['x-colo'] ? this.coloHooks.onSourceHandoff : undefined;
    const m = new OutgoingMigration(
      {
        machine: this.vm.machine,
        tracker: this.dirtyTracker(),
        name: this.vm.opts.name ?? 'colo',
        // Both one at a time with the user's stop and cont (Vm.runStateOp).
        pauseForSwitchover: () =>
          this.vm.runStateOp(async () => {
            const wasRunning = this.vm.machine.running;
            this.vm.frontEnd?.pauseReading();
            if (colo !== undefined && this.vm.inputTap === null) {
              // A paused front end still numbers a client's connect or reset: from here until
              // the mirror starts, such input is kept for the secondary (PrimaryNet.start).
              const backlog: NicInput[] = [];
              this.vm.inputBacklog = backlog;
              this.vm.inputTap = (ev) => backlog.push(ev);
            }
            await this.vm.machine.pause('finish-migrate');
            return wasRunning;
          }),
        resumeAfterFailure: (run, reason) =>
          this.vm.runStateOp(async () => {
            // The migration ended because the process quits (close()): the machine is going away.
            if (this.closed) return;
            if (this.vm.inputBacklog !== null) {
              this.vm.inputBacklog = null;
              this.vm.inputTap = null;
            }
            if (this.vm.machine.runState === 'finish-migrate') this.vm.machine.setRunState('paused');
            // The image let go at stop-and-copy (one image for both ends) comes back before the
            // guest may run (the destination, which took it before `loaded`, may still be letting
            // it go: a short bounded retry); a process that keeps it keeps this VM paused (QEMU's
            // cont after a failed inactivation): `cont` tries again.
            if (!(await this.vm.activateDisk(reason === 'cancel' ? 'after the cancelled migration' : 'after the failed migration', () => this.closed || this.vm.exiting))) run = false;
            try {
              // The VM runs on here: an address it cannot take back (another process took it,
              // or it never had it: closeFrontEnd stopped its retries) must not keep it paused.
              if (this.vm.frontEnd === null) await this.vm.startFrontEnd({ untilFree: true });
              else this.vm.frontEnd.resumeReading();
              if (run) await this.vm.machine.cont();
            } catch (err) {
              // The process began to quit meanwhile (colo up stopping a pair: its secondary's
              // end failed the migration a moment before this process's own stop came) and
              // destroyed the machine under the resume: expected, not an error.
              if (!this.closed && !this.vm.exiting) throw err;
              log.debug(`the VM was not resumed after the migration: the process is quitting (${errorMessage(err)})`);
            }
          }),
        closeFrontEnd: async () => {
          this.vm.stopListenRetry();
          const fe = this.vm.frontEnd;
          this.vm.frontEnd = null;
          // This process lives on (postmigrate): replies of connections the guest closed may
          // finish, unless it quits first.
          if (fe !== null) this.vm.drainingFrontEnd = fe;
          await fe?.close({ drainClosed: true });
        },
        markMigrated: () => this.vm.machine.setRunState('postmigrate'),
        event: (name, data) => this.vm.event(name, data),
      },
      {
        host: target.host === '' ? 'localhost' : target.host,
        port: target.port,
        channels: caps.multifd ? params['multifd-channels'] : 0,
        capabilities: { ...caps },
        downtimeLimitMs: params['downtime-limit'],
        bandwidth: () => this.settings.parameters['max-bandwidth'],
        senders: this.senders,
        ...(colo === undefined ? {} : { onHandoff: colo }),
      },
    );
    this.senders = null; // the migration owns them now
    this.outgoing = m;
    this.incoming = null;
    this.stats = m.stats;
    m.start();
    this.stats = m.stats; // start() made the core's stats object
    void m.finished.then(() => {
      if (m.stats.status === 'cancelled') this.noteAborting(m.session);
      // A failed or cancelled migration leaves the VM running here: be ready for the next.
      if (this.outgoing === m && (m.stats.status === 'failed' || m.stats.status === 'cancelled')) this.refreshSenders();
    });
  }

  /** A cancelled migration's session, whose channel close() drops if it is still open then. */
  private noteAborting(session: SourceSession): void {
    if (this.closed) {
      void session.destroy();
      return;
    }
    this.aborting.add(session);
    // By then its channel has closed, or been dropped (MainChannel.close's bound), also one
    // that connected only after the cancel (SourceSession.connect), up to
    // limits.migrationConnectTimeoutMs after the start.
    setTimeout(() => this.aborting.delete(session), limits.migrationConnectTimeoutMs + limits.migrationAbortDeliveryMs + 1000).unref();
  }

  /**
   * `cont` while a migration is under way, beyond what Vm.cont handles (finish-migrate refused;
   * a destination until the source's `go` only sets autostart). As QEMU: an outgoing precopy
   * migration does not keep the VM from running again after a `stop` — its rounds go on and
   * send what the guest dirties, and the switchover pause takes the VM as it finds it
   * (running: the destination runs it). Refused: a VM whose COLO failover runs (the failover
   * runs it; in COLO before that, ColoController.cont answers), and a destination still busy
   * otherwise.
   */
  refuseCont(): void {
    if (!this.busy || this.stats === null) return;
    if (this.stats.status === 'colo') {
      throw new QmpCommandError('GenericError', 'the VM is in a COLO failover, which runs it');
    }
    if (this.incoming !== null) throw new QmpCommandError('GenericError', 'Migration is not finalized yet');
  }

  /**
   * migrate_cancel: cancels an outgoing migration; no effect otherwise (as QEMU). A primary in
   * COLO refuses it: its migration cannot be undone, and answering {} while COLO went on left
   * a script waiting for status cancelled for good. (QEMU's breaks COLO off and then waits for
   * an x-colo-lost-heartbeat that it refuses, the migration no longer being in COLO.)
   */
  cancel(): void {
    const out = this.outgoing;
    if (out !== null && this.stats === out.stats && this.stats.status === 'colo') {
      throw new QmpCommandError('GenericError', 'The migration is in COLO and cannot be cancelled: x-colo-lost-heartbeat ends COLO on this node, which runs on unprotected');
    }
    out?.cancel();
  }

  // ---- incoming ----

  /**
   * `--incoming tcp:...` at start, or `migrate-incoming` after `--incoming defer`. Changes
   * nothing when it fails: receiver threads already started are ended, and no migration is
   * recorded (query-migrate shows none).
   */
  async startIncoming(uri: string, opts: { exitOnError?: boolean } = {}): Promise<void> {
    if (!uri.startsWith('tcp:')) throw new QmpCommandError('GenericError', `Invalid incoming migration URI '${uri}' (expected tcp:HOST:PORT)`);
    const target = tcpTarget(uri);
    // x-colo is read when the source connects, not now: a destination that listens can still be
    // configured (refuseIfBusy), so the capability set after `--incoming tcp:` must count.
    // Without that the hello passed (the capability is on), no hand-off followed, and the
    // secondary failed on the first COLO frame while the primary believed it was in COLO.
    const caps = this.settings.capabilities;
    const colo = this.coloHooks.onDestinationHandoff;
    const coloSession = this.coloHooks.onDestinationSession;
    // Receiver threads start listening now; the source's hello only configures them.
    let receivers: MultifdReceiver | null = null;
    if (this.settings.capabilities.multifd) {
      const machine = this.vm.machine;
      receivers = await MultifdReceiver.spawn({
        memory: machine.memory,
        host: target.host,
        channels: this.settings.parameters['multifd-channels'],
        pagesMax: (machine.maximumPages * limits.wasmPageBytes) / limits.pageBytes,
        ramPages: new SharedArrayBuffer(4),
      });
    }
    const vm = this.vm;
    const m = new IncomingMigration(
      {
        machine: this.vm.machine,
        startRunning: async (run) => {
          // After `go` the source has let go of the guest: a --net address that cannot be
          // listened on (still held by the source's slow close, or by another process) must
          // not lose it. The guest runs on and the front end keeps trying (Vm.startFrontEnd).
          await this.vm.startFrontEnd({ untilFree: true });
          // -S (or `stop` while waiting), or a guest that was paused on the source: stay
          // paused until `cont`, as QEMU does. One at a time with the user's stop and cont
          // (Vm.runStateOp): a `stop` that came while the vCPU was being started found it
          // not running and the migration not finished, cleared only autostart, and the
          // guest ran all the same.
          await this.vm.runStateOp(async () => {
            if (!this.vm.autostart || !run) return;
            await this.vm.machine.cont();
          });
        },
        event: (name, data) => this.vm.event(name, data),
        ended: (status, message) => this.incomingEnded(status, message),
        get exiting() {
          return vm.exiting;
        },
      },
      {
        host: target.host,
        port: target.port,
        capabilities: this.settings.capabilities,
        receivers,
        // The core hands over only when the hello asks for x-colo, which it accepts only with
        // this side's x-colo on.
        ...(colo === undefined ? {} : { onHandoff: colo }),
        ...(colo === undefined || coloSession === undefined
          ? {}
          : {
              onSession: (session: IncomingSession) => {
                if (caps['x-colo']) coloSession(session);
              },
            }),
      },
    );
    try {
      await m.listen();
      // The process quit while the receiver threads started or this listened: close() found
      // no incoming migration, and this one, listening, kept the process alive for good.
      if (this.closed) throw new ChannelClosedError('the VM is quitting');
    } catch (err) {
      // No session: close() ends the receiver threads (and stops listening).
      await m.close().catch((e: unknown) => log.debug(`closing the incoming migration that could not listen: ${errorMessage(e)}`));
      throw err;
    }
    this.exitOnError = opts.exitOnError ?? true;
    this.incoming = m;
    this.stats = m.stats;
  }

  /** QMP migrate-incoming. */
  async migrateIncoming(uri: string, exitOnError: boolean | undefined): Promise<void> {
    if (this.vm.opts.incoming === null) throw new QmpCommandError('GenericError', "'-incoming' was not specified on the command line");
    if (!this.deferred) throw new QmpCommandError('GenericError', 'The incoming migration has already been started');
    // Claimed before the first await (starting multifd receivers takes a while): a second
    // migrate-incoming meanwhile, from another client, is refused. Given back when starting
    // fails (say the port is in use), so that the command can be tried again.
    this.deferred = false;
    try {
      await this.startIncoming(uri, exitOnError === undefined ? {} : { exitOnError });
    } catch (err) {
      this.deferred = true;
      throw err;
    }
  }

  private incomingEnded(status: 'failed' | 'cancelled', message: string): void {
    // The driver logged it in one line (error level for a failure, info for a cancel).
    log.debug(`incoming migration ${status}: ${message}`);
    if (!this.exitOnError) return;
    this.vm.quit(1);
  }

  // ---- file ----

  private startFile(path: string): void {
    const stats = newStats(performance.now(), this.vm.machine.ram().byteLength);
    this.stats = stats;
    this.outgoing = null;
    this.incoming = null;
    this.setStatus(stats, 'setup');
    void this.runFile(stats, path);
  }

  private setStatus(stats: MigrationStats, status: MigrationStatus): void {
    stats.status = status;
    this.vm.event('MIGRATION', { status });
  }

  private async runFile(info: MigrationStats, path: string): Promise<void> {
    const m = this.vm.machine;
    let wasRunning = false;
    try {
      info.setupTimeMs = performance.now() - info.startTimeMs;
      this.setStatus(info, 'active');
      // One at a time with the user's stop and cont (Vm.runStateOp).
      wasRunning = await this.vm.runStateOp(async () => {
        const running = m.running;
        await m.pause('finish-migrate');
        return running;
      });
      const stoppedAt = performance.now();
      this.setStatus(info, 'device');
      const vcpu = await m.saveVcpu();
      const r = saveMachineToFile(m, vcpu, path);
      info.transferredBytes = r.bytes;
      info.normalPages = r.normalPages;
      info.zeroPages = r.zeroPages;
      info.diskBlocks = r.diskBlocks;
      info.dirtySyncCount = 1;
      info.downtimeMs = performance.now() - stoppedAt;
      info.endTimeMs = performance.now();
      m.setRunState('postmigrate');
      this.setStatus(info, 'completed');
      log.info(`machine saved to ${path} (${r.bytes} bytes, ${r.normalPages} pages, ${r.zeroPages} zero pages)`);
    } catch (err) {
      info.errorDesc = describeError(err);
      info.endTimeMs = performance.now();
      log.warn(`migration to ${path} failed: ${info.errorDesc}`);
      await this.vm.runStateOp(async () => {
        if (m.runState === 'finish-migrate') m.setRunState('paused');
        if (wasRunning) {
          try {
            await m.cont();
          } catch (e) {
            log.error(`could not resume the VM after a failed migration: ${errorMessage(e)}`);
          }
        }
      });
      this.setStatus(info, 'failed');
    }
  }

  // ---- queries and the rest ----

  query(): Record<string, unknown> {
    if (this.stats === null) return {};
    const live = this.outgoing !== null && this.stats === this.outgoing.stats && this.busy ? this.outgoing.session.bytesInFlight() : 0;
    if (live === 0) return migrationInfo(this.stats, performance.now());
    // Inside a round: count what already went out.
    const s = { ...this.stats, transferredBytes: this.stats.transferredBytes + live, remainingBytes: Math.max(0, this.stats.remainingBytes - live) };
    return migrationInfo(s, performance.now());
  }

  /** A migration with open channels (what yank can close). */
  private get hasChannels(): boolean {
    if (!this.busy) return false;
    return this.outgoing !== null || (this.incoming !== null && this.incoming.session !== null);
  }

  /** yank {type: migration}: drop the migration channels at once. */
  yank(): void {
    if (!this.hasChannels) throw new QmpCommandError('DeviceNotFound', 'No yank instance of type migration is registered');
    if (this.coloHooks.yank?.() === true) return;
    if (this.outgoing !== null) this.outgoing.yank();
    else this.incoming?.yank();
  }

  /** Instances `query-yank` lists. */
  yankInstances(): { type: string }[] {
    return this.hasChannels ? [{ type: 'migration' }] : [];
  }

  async close(): Promise<void> {
    this.closed = true;
    const senders = this.senders;
    this.senders = null;
    await senders?.destroy();
    await this.incoming?.close();
    // With a reason, so that the migration ends now (status failed, its switchover timer and
    // waits stopped) instead of when a timer of its own fires: that kept the quitting process
    // alive for up to 30 s, and then the migration's end started new multifd sender threads
    // that kept it alive for good.
    // (A session COLO owns, after the hand-off, is COLO's to end: colo.close() came first.)
    const out = this.outgoing;
    if (out !== null && this.busy) await out.session.destroy(out.core.finished ? undefined : new ChannelClosedError('the VM is quitting'));
    // A cancelled migration's channel may still be open for its abort frame (SourceSession.abort): the exit does not wait for it.
    else if (out !== null && out.core.phase === 'cancelled') await out.session.destroy();
    // So may those of migrations cancelled before the last one (which replaced them).
    const aborting = [...this.aborting];
    this.aborting.clear();
    await Promise.all(aborting.map((s) => s.destroy()));
  }
}
