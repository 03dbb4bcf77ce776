import { QmpCommandError } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { logger } from '../core/log.js';
import type { Vm } from '../control/vm.js';
import type { IncomingSession, SourceSession } from '../migration/session.js';
import type { ColoMode, ExitReason } from './core.js';
import { PrimaryDriver, SecondaryDriver, type DriverHost } from './driver.js';

const log = logger('colo');

/**
 * COLO on one VM process: installs the hand-off hooks into the migration engine, owns the
 * primary or secondary driver, and answers x-colo-lost-heartbeat, yank and query-colo-status.
 */
export class ColoController implements DriverHost {
  private driver: PrimaryDriver | SecondaryDriver | null = null;
  mode: ColoMode | 'none' = 'none';
  lastMode: ColoMode | 'none' = 'none';
  reason: ExitReason | 'none' = 'none';
  closing = false;

  constructor(readonly vm: Vm) {
    vm.migration.coloHooks = {
      onSourceHandoff: (session) => this.startPrimary(session),
      onDestinationHandoff: (session) => this.startSecondary(session),
      onDestinationSession: (session) => this.attachCache(session),
      yank: () => this.yank(),
      checkpointDelaySet: () => {
        if (this.driver instanceof PrimaryDriver) this.driver.dispatch({ type: 'delaySet' });
      },
    };
  }

  private startPrimary(session: SourceSession): void {
    log.info('the secondary loaded the state: entering COLO as the primary');
    this.mode = 'primary';
    this.lastMode = 'primary';
    // A new COLO session (re-protection after a failover): no failover yet, as QEMU's
    // failover_init_state at every COLO start.
    this.reason = 'none';
    const d = new PrimaryDriver(this, session);
    this.driver = d;
    d.start();
  }

  /** The RAM cache, filled during the initial migration (every page goes to RAM and cache). */
  private cache: SharedArrayBuffer | null = null;

  private attachCache(session: IncomingSession): void {
    const m = this.vm.machine;
    const cache = new SharedArrayBuffer(m.maximumPages * limits.wasmPageBytes);
    // The full round covers every page (data, zero or known-zero ranges), so at hand-off the
    // cache equals guest RAM without a bulk copy.
    this.cache = cache;
    // No frame was read yet, so no receiver exists: this takes effect at once.
    void session.setPageTarget({ ram: true, cache, received: null }).catch((err: unknown) => log.warn(`COLO cache: ${String(err)}`));
  }

  private startSecondary(session: IncomingSession): void {
    log.info('the state is loaded: entering COLO as the secondary');
    this.mode = 'secondary';
    this.lastMode = 'secondary';
    this.reason = 'none';
    const d = new SecondaryDriver(this, session, this.cache, null);
    this.cache = null;
    this.driver = d;
    d.start();
  }

  /** A COLO secondary before any failover: a crash of its guest is COLO's to handle (and say). */
  get secondaryInColo(): boolean {
    return this.mode === 'secondary' && this.active;
  }

  private get active(): boolean {
    const d = this.driver;
    return d !== null && d.core.phase !== 'done' && d.core.phase !== 'failover';
  }

  setStatus(status: 'colo' | 'completed' | 'failed'): void {
    const stats = this.vm.migration.stats;
    if (stats !== null) {
      stats.status = status;
      if (status === 'completed') stats.endTimeMs = performance.now();
    }
    this.vm.event('MIGRATION', { status });
  }

  exited(mode: ColoMode, reason: ExitReason): void {
    this.mode = 'none';
    this.reason = reason;
    this.vm.event('COLO_EXIT', { mode, reason });
  }

  /** x-colo-lost-heartbeat: the peer is declared lost; this node continues alone. */
  lostHeartbeat(): void {
    if (this.driver === null || !this.active) {
      if (this.driver !== null && this.driver.core.phase === 'failover') return; // already failing over
      throw new QmpCommandError('GenericError', 'VM is not in COLO mode');
    }
    this.driver.lostHeartbeat();
  }

  /**
   * `cont` while in COLO (Vm.cont, after its own checks): the driver runs it between its
   * checkpoints. null when COLO does not run here (or fails over: the failover runs the VM).
   */
  cont(): Promise<void> | null {
    if (this.driver === null || !this.active) return null;
    return this.driver.cont();
  }

  /**
   * The guest exited by itself (proc_exit): resolves when the process may end (the drivers'
   * guestExited: a primary first lets the SVM's copy release the guest's last output). Never rejects.
   */
  guestExited(): Promise<void> {
    if (this.driver === null || !this.active) return Promise.resolve();
    return this.driver.guestExited();
  }

  /** yank {type: migration} while in COLO: close the channels. Returns false when not in COLO. */
  yank(): boolean {
    if (this.driver === null || this.driver.core.phase === 'done') return false;
    this.driver.yank();
    return true;
  }

  /** The process exits: stop timers; what fails from now on is expected. */
  close(): void {
    this.closing = true;
    this.driver?.close();
  }

  query(): Record<string, unknown> {
    // QEMU's fields; the checkpoint counters are in query-migrate's x-colo entry (counters()).
    // reason, as QEMU's: none while COLO runs (or never ran), processing while a failover is
    // under way, and once COLO ended the COLO_EXIT reason (request or error).
    const f = this.driver?.core.failoverState ?? 'none';
    const reason = this.reason !== 'none' ? this.reason : f === 'require' || f === 'active' || f === 'relaunch' ? 'processing' : 'none';
    return { mode: this.mode, 'last-mode': this.lastMode, reason };
  }

  counters(): Record<string, unknown> {
    const d = this.driver;
    if (d === null) return {};
    const out: Record<string, unknown> = { checkpoints: d.core.checkpoints, 'failover-state': d.core.failoverState };
    if (d instanceof PrimaryDriver) {
      const st = d.stats;
      const sum = st.summary();
      const by = d.core.checkpointsBy;
      const cmp = d.net.compare;
      Object.assign(out, {
        'checkpoints-periodic': by.periodic,
        'checkpoints-mismatch': by.mismatch,
        'checkpoints-timeout': by.timeout,
        'checkpoints-resync': by.resync,
        'last-pause-ms': round3(st.lastPauseMs),
        'max-pause-ms': round3(st.maxPauseMs),
        'mean-pause-ms': round3(sum.mean),
        'p99-pause-ms': round3(sum.p99),
        'pause-samples': sum.samples,
        'last-checkpoint-bytes': st.lastBytes,
        'mean-checkpoint-bytes': Math.round(sum.meanBytes),
        'checkpoints-copied': st.copied,
        'checkpoints-sent-from-ram': st.sentFromRam,
        'compare-matched-bytes': cmp.matchedBytes,
        'compare-checkpoint-released-bytes': cmp.checkpointReleasedBytes,
        'compare-held-bytes': cmp.held,
        'compare-matched-chunks': cmp.matchedChunks,
        'compare-pvm-wait-mean-ms': cmp.matchedChunks > 0 ? round3(cmp.pvmWaitMsSum / cmp.matchedChunks) : 0,
        'svm-output-channel': d.net.outputChannelOpen ? 'direct' : 'main',
        'svm-output-channel-bytes': d.net.outputChannelBytes,
        'svm-output-channel-stalls': d.net.outputChannelStalls,
        'mirror-channel': d.net.mirrorOnChannel ? 'direct' : 'main',
        'mirror-channel-bytes': d.net.mirrorChannelBytes,
      });
    }
    return out;
  }
}

function round3(x: number): number {
  return Math.round(x * 1000) / 1000;
}
