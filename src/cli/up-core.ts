/**
 * `colo up` supervision as plain data (like colo/core.ts): events in, actions out, no
 * processes, no sockets, no timers. The driver (cli/up.ts) starts the `colo run` children,
 * talks QMP to them and feeds back what happened.
 *
 * The pair's phases:
 *   starting      the first primary and secondary are booting
 *   reprotecting  a survivor runs alone; a new secondary is booting
 *   protecting    the initial migration into COLO runs
 *   protected     both are in status colo
 *   failover      a child died; the survivor is being told (x-colo-lost-heartbeat)
 *   unprotected   one node serves alone (waiting to retry, or given up)
 *   stopping      SIGINT/SIGTERM or a lost service: children are being stopped
 *   stopped       every child is gone; exit
 *
 * A primary that leaves COLO by itself (COLO_EXIT while the pair is protected: its link to the
 * secondary broke, or the stream was corrupt) serves on alone, and its secondary's state falls
 * behind with every reply released from then on. That secondary must never take over: it is
 * killed at once and a new one protects the primary again, at once after a protection that
 * lasted stableMs, else after the pause of a failed attempt (as after a failover).
 *
 * A hung child (its QMP heartbeat goes unanswered), or one whose guest crashed (GUEST_PANICKED:
 * the process lives on, its guest does not), is fenced with SIGKILL when a partner can
 * carry on without it: a primary of a protected pair, or a secondary that is not taking over.
 * A secondary in COLO whose guest crashed is the exception: the primary's checkpoint replaces
 * its state; it is fenced only if it stays crashed (limits.upSecondaryCrashedMs), or crashes
 * again and again (limits.upSecondaryCrashesMax within upSecondaryCrashWindowMs).
 * A primary whose guest crashed while the protection completed (no partner in COLO yet) is
 * fenced once the pair is protected, as a COLO_EXIT of that moment is acted on then.
 * Its death runs the same failover as a crash. A hung node with no partner is only reported:
 * killing it would turn a stall into an outage. A crashed primary with no partner in COLO is
 * the end of the service (its guest does not come back, a crashed VM cannot be migrated).
 */
import { limits } from '../core/limits.js';

export type Role = 'primary' | 'secondary';
export type PairPhase = 'starting' | 'reprotecting' | 'protecting' | 'protected' | 'failover' | 'unprotected' | 'stopping' | 'stopped';

export interface NodeInfo {
  readonly id: number;
  role: Role;
  pid: number | null;
  ready: boolean;
  alive: boolean;
  /** Why the driver gave up on it (startFailed), for the message about its death. */
  failure?: string;
  /** How its process ended (`SIGKILL`, `exit code 1`, `killed: ...`), once it did. */
  ended?: string;
  /** Guest crashes of a secondary in COLO left to the primary's checkpoints (the first is said at info). */
  crashes?: number;
  /** When its latest crashes came (`at` of the events, within limits.upSecondaryCrashWindowMs; at most upSecondaryCrashesMax). */
  crashedAt?: number[];
  /** Its guest exited by itself (SHUTDOWN, guest: true): its process's end is that exit, not a failure. */
  guestExited?: boolean;
  /** Its guest crashed (GUEST_PANICKED) while it was the primary: it has no good state to protect. */
  guestCrashed?: string;
}

export type PairEvent =
  | { type: 'start' }
  /**
   * Instead of start: a new supervisor takes over the children of one that died (colo up run
   * again on its --state-dir). The driver has settled what they are: a primary, with its
   * secondary when they are still a protected pair (else it runs alone). `nextId`: above every
   * node id the folder has seen.
   */
  | { type: 'adopt'; primary: { id: number; pid: number }; secondary: { id: number; pid: number } | null; nextId: number }
  /** The driver started the process of `node`. */
  | { type: 'spawned'; node: number; pid: number }
  /** `node` answers QMP and is configured (capabilities set; a secondary waits for migrate-incoming). */
  | { type: 'ready'; node: number }
  /** `node` could not be brought up (the driver kills it; its `exited` follows). */
  | { type: 'startFailed'; node: number; error: string }
  | { type: 'exited'; node: number; code: number | null; signal: string | null }
  | { type: 'protected' }
  | { type: 'protectFailed'; error: string }
  /** The secondary `node` took over (COLO_EXIT) after its primary died. */
  | { type: 'tookOver'; node: number }
  /** The primary `node` left COLO after its secondary died. */
  | { type: 'continued'; node: number }
  /** `guestDead`: the primary left COLO, but its failover could not run its guest (it serves nothing). */
  | { type: 'failoverFailed'; node: number; error: string; guestDead?: boolean }
  /** `node` sent COLO_EXIT (also the ones the supervisor asked for with x-colo-lost-heartbeat). */
  /** `guestDead`: a primary whose guest does not run (its failover could not run it). */
  | { type: 'coloExit'; node: number; mode: string; reason: string; guestDead?: boolean }
  /** `node` has not answered its heartbeat (query-status) for `ms`. */
  | { type: 'unresponsive'; node: number; ms: number }
  /**
   * The guest of `node` crashed (GUEST_PANICKED): the process lives on, but serves nothing.
   * `stuck`: it is still crashed limits.upSecondaryCrashedMs later (no checkpoint replaced it).
   * `at`: when (ms on the driver's monotonic clock), to count a secondary's repeated crashes.
   */
  | { type: 'crashed'; node: number; message: string; at: number; stuck?: boolean }
  /**
   * The guest of `node` exited by itself (SHUTDOWN, guest: true): its process ends next, with
   * the guest's exit status; `code`: that status, when the event said it (its exit-code).
   */
  | { type: 'guestShutdown'; node: number; code?: number }
  /** `node` answers its heartbeat again, after `ms` without. */
  | { type: 'responsive'; node: number; ms: number }
  | { type: 'signal'; signal: string }
  /** `gen`: for 'stable', the protection it was armed for. */
  | { type: 'timer'; name: 'retry' | 'stopTimeout' | 'stable' | 'svmExit'; gen?: number };

export type PairAction =
  | { type: 'print'; line: string }
  | { type: 'log'; level: 'debug' | 'info' | 'warn' | 'error'; msg: string }
  /** Start a `colo run` child; a secondary gets `--incoming defer` and a fresh disk image. */
  | { type: 'spawn'; node: number; role: Role }
  /** Migrate from `primary` to `secondary` with x-colo until both are in status colo. */
  | { type: 'protect'; primary: number; secondary: number }
  /** x-colo-lost-heartbeat on the secondary `node`: it takes over the service. */
  | { type: 'takeover'; node: number }
  /** x-colo-lost-heartbeat on the primary `node`: it continues unprotected. */
  | { type: 'continueAlone'; node: number }
  | { type: 'kill'; node: number; signal: 'SIGTERM' | 'SIGKILL' }
  /** The disk image of a dead node is stale: remove it if the supervisor created it. */
  | { type: 'discardDisk'; node: number }
  | { type: 'setTimer'; name: 'retry' | 'stopTimeout' | 'stable' | 'svmExit'; ms: number; gen?: number }
  /** Every child is gone; `primary` is the node that served last (its disk is the current one). */
  | { type: 'exit'; code: number; primary: number | null };

export interface PairConfig {
  /** The service address, for messages (`127.0.0.1:6379`). */
  address: string;
  /** Where the children's QMP sockets, serial files and disk copies are (for the first line). */
  stateDir?: string;
  /** Consecutive failed protection attempts before giving up (default limits.upProtectAttemptsMax). */
  protectAttemptsMax?: number;
  retryDelayMs?: number;
  /** After giving up: the interval of the later attempts (default limits.upProtectRetryLaterMs). */
  retryLaterMs?: number;
  /** A protection shorter than this is a failed attempt (default limits.upProtectStableMs; 0: none is). */
  stableMs?: number;
  stopTimeoutMs?: number;
}

export class PairCore {
  phase: PairPhase = 'starting';
  primary: NodeInfo | null = null;
  secondary: NodeInfo | null = null;
  /**
   * The nodes that live, and the dead primary and secondary: a dead node that is neither is
   * forgotten (forgetReplaced), so that a pair that lives for years through many failovers
   * keeps a few entries, not one per secondary it ever started.
   */
  private readonly nodes = new Map<number, NodeInfo>();
  private nextId = 1;
  private failures = 0;
  /** Protections so far, and whether the current (or last) one lasted stableMs. */
  private protections = 0;
  private stable = true;
  private exitCode = 0;
  /** The node whose guest exited by itself and so stopped the pair: its exit status is the pair's. */
  private guestExitNode: number | null = null;
  /** The exit status its SHUTDOWN said: the pair's, should its process be killed (stopTimeout) before it ends. */
  private guestExitCode: number | null = null;
  /**
   * A COLO_EXIT of the pair's nodes that came while the protection was completing (protect()
   * saw both in status colo, but 'protected' was not stepped yet): acted on at 'protected'.
   */
  private exitWhileProtecting: Extract<PairEvent, { type: 'coloExit' }> | null = null;
  /**
   * Likewise a crash of the primary's guest (GUEST_PANICKED) while the protection completes:
   * with no partner in COLO yet it could not be fenced, and nothing would ask again once the
   * secondary is; acted on at 'protected', before its COLO_EXIT (which it explains).
   */
  private crashWhileProtecting: Extract<PairEvent, { type: 'crashed' }> | null = null;
  /** What killed the node whose death started the current failover (`SIGKILL`, `exit code 1`). */
  private cause = '';
  private readonly attemptsMax: number;
  private readonly retryDelayMs: number;
  private readonly retryLaterMs: number;
  private readonly stableMs: number;
  private readonly stopTimeoutMs: number;

  constructor(private readonly cfg: PairConfig) {
    this.attemptsMax = cfg.protectAttemptsMax ?? limits.upProtectAttemptsMax;
    this.retryDelayMs = cfg.retryDelayMs ?? limits.upProtectRetryDelayMs;
    this.retryLaterMs = cfg.retryLaterMs ?? limits.upProtectRetryLaterMs;
    this.stableMs = cfg.stableMs ?? limits.upProtectStableMs;
    this.stopTimeoutMs = cfg.stopTimeoutMs ?? limits.upStopTimeoutMs;
  }

  node(id: number): NodeInfo | undefined {
    return this.nodes.get(id);
  }

  /** Nodes whose process has not exited yet. */
  get living(): NodeInfo[] {
    return [...this.nodes.values()].filter((n) => n.alive);
  }

  step(e: PairEvent): PairAction[] {
    const out: PairAction[] = [];
    switch (e.type) {
      case 'start': {
        this.primary = this.add('primary');
        this.secondary = this.add('secondary');
        this.phase = 'starting';
        out.push({ type: 'print', line: this.cfg.stateDir === undefined ? 'pair: starting' : `pair: starting (state in ${this.cfg.stateDir})` });
        out.push({ type: 'spawn', node: this.primary.id, role: 'primary' }, { type: 'spawn', node: this.secondary.id, role: 'secondary' });
        break;
      }
      case 'adopt': {
        if (this.nodes.size > 0) break;
        this.nextId = e.nextId;
        const adopt = (a: { id: number; pid: number }, role: Role): NodeInfo => {
          const n: NodeInfo = { id: a.id, role, pid: a.pid, ready: true, alive: true };
          this.nodes.set(n.id, n);
          this.nextId = Math.max(this.nextId, n.id + 1);
          return n;
        };
        this.primary = adopt(e.primary, 'primary');
        const where = this.cfg.stateDir === undefined ? '' : ` (state in ${this.cfg.stateDir})`;
        if (e.secondary !== null) {
          this.secondary = adopt(e.secondary, 'secondary');
          this.phase = 'protected';
          this.protections += 1;
          out.push({ type: 'print', line: `pair: adopted${where}: protected (primary pid ${this.primary.pid}, secondary pid ${this.secondary.pid})` });
        } else {
          this.phase = 'unprotected';
          out.push({ type: 'print', line: `pair: adopted${where}: primary ${this.primary.pid} runs unprotected` });
          this.reprotect(out);
        }
        break;
      }
      case 'spawned': {
        const n = this.nodes.get(e.node);
        if (n !== undefined) n.pid = e.pid;
        break;
      }
      case 'ready': {
        const n = this.nodes.get(e.node);
        if (n === undefined || !n.alive) break;
        n.ready = true;
        this.maybeProtect(out);
        break;
      }
      case 'startFailed': {
        const n = this.nodes.get(e.node);
        if (n !== undefined) n.failure = e.error;
        out.push({ type: 'log', level: 'warn', msg: `${this.describe(e.node)} did not come up: ${e.error}` });
        out.push({ type: 'kill', node: e.node, signal: 'SIGKILL' });
        break;
      }
      case 'exited':
        this.exited(e.node, e.code, e.signal, out);
        break;
      case 'protected': {
        if (this.phase !== 'protecting') break;
        const s = this.secondary!;
        if (!s.alive) {
          // It died right after it entered COLO: the driver saw both in status colo (the
          // secondary's event was in its QMP log already), but its exit came first and was taken
          // for the end of a failing migration. The primary is in COLO with no partner: tell it
          // to go on alone now, as after a death while protected, rather than report a
          // protection that is not there. It ended at once: a failed attempt.
          this.stable = this.stableMs === 0;
          this.exitWhileProtecting = null;
          this.crashWhileProtecting = null;
          this.secondaryDied(s, out);
          break;
        }
        this.phase = 'protected';
        this.protections += 1;
        // The failures count on until the protection has lasted stableMs.
        if (this.stableMs === 0) {
          this.stable = true;
          this.failures = 0;
        } else {
          this.stable = false;
          out.push({ type: 'setTimer', name: 'stable', ms: this.stableMs, gen: this.protections });
        }
        out.push({ type: 'print', line: `pair: protected (primary pid ${this.primary!.pid}, secondary pid ${this.secondary!.pid})` });
        // A primary whose guest crashed meanwhile: fenced now, so that the secondary takes over.
        const crash = this.crashWhileProtecting;
        this.crashWhileProtecting = null;
        if (crash !== null) out.push(...this.step(crash));
        // A node that left COLO meanwhile: as if it left now (its secondary is out of date, or it
        // is one). After a crash of the primary it is the crash's COLO_EXIT: the fenced primary's
        // failure makes it change nothing.
        const early = this.exitWhileProtecting;
        this.exitWhileProtecting = null;
        if (early !== null) out.push(...this.step(early));
        break;
      }
      case 'protectFailed': {
        if (this.phase !== 'protecting') break;
        this.exitWhileProtecting = null;
        this.crashWhileProtecting = null;
        this.failures++;
        out.push({ type: 'print', line: `pair: unprotected (attempt ${this.failures} to protect it failed: ${e.error})` });
        this.phase = 'unprotected';
        const s = this.secondary;
        if (s !== null && s.alive) {
          // Its exit brings the next attempt.
          out.push({ type: 'kill', node: s.id, signal: 'SIGKILL' });
        } else {
          this.secondary = null;
          this.retry(out);
        }
        break;
      }
      case 'tookOver': {
        if (this.phase !== 'failover' || this.secondary?.id !== e.node) break;
        const s = this.secondary;
        // The dead primary's disk was kept until now: had the takeover failed, it would have
        // been the newest copy of the data (the drive the supervisor leaves behind).
        if (this.primary !== null) out.push({ type: 'discardDisk', node: this.primary.id });
        s.role = 'primary';
        this.primary = s;
        this.secondary = null;
        this.phase = 'unprotected';
        out.push({ type: 'print', line: `pair: primary died (${this.cause}); secondary ${s.pid} took over on ${this.cfg.address}` });
        this.afterProtectionEnded(out);
        break;
      }
      case 'continued': {
        if (this.phase !== 'failover' || this.primary?.id !== e.node) break;
        this.phase = 'unprotected';
        out.push({ type: 'print', line: `pair: secondary died (${this.cause}); primary ${this.primary.pid} continues unprotected` });
        this.afterProtectionEnded(out);
        break;
      }
      case 'failoverFailed': {
        if (this.phase !== 'failover') break;
        if (this.primary?.id === e.node && e.guestDead === true) {
          // Its secondary is dead and its own guest does not run: nothing serves (its disk, the
          // newest copy of the data, is the one kept).
          this.lost(`primary ${this.primary.pid} could not go on alone after its secondary died (${this.cause}): ${e.error}`, out);
        } else if (this.primary?.id === e.node) {
          // The primary still serves, whatever it said: go on and protect it again.
          out.push({ type: 'log', level: 'warn', msg: `x-colo-lost-heartbeat on the primary failed: ${e.error}` });
          this.phase = 'unprotected';
          out.push({ type: 'print', line: `pair: secondary died (${this.cause}); primary ${this.primary.pid} continues unprotected` });
          this.afterProtectionEnded(out);
        } else {
          this.lost(`the secondary could not take over: ${e.error}`, out);
        }
        break;
      }
      case 'unresponsive':
        this.fence(e.node, `hung, no answer to QMP for ${e.ms} ms`, `has not answered QMP for ${e.ms} ms`, out);
        break;
      case 'crashed': {
        const n = this.nodes.get(e.node);
        if (n?.alive === true && n === this.primary) n.guestCrashed ??= e.message;
        // A primary with no partner in COLO: nothing holds the guest's state but its crashed
        // self (a guest does not come back from a crash, and a crashed VM cannot be migrated):
        // the service is lost. Before, it was left running and a new secondary tried to
        // protect it every retry period, for ever, each attempt refused.
        if (n?.alive === true && n === this.primary && n.failure === undefined && (this.phase === 'unprotected' || this.phase === 'reprotecting')) {
          this.lost(`the guest of ${this.describe(e.node)} crashed (${e.message}) and no partner can take over`, out);
          break;
        }
        if (this.phase === 'protecting' && n?.alive === true && n === this.primary) {
          this.crashWhileProtecting ??= e;
          out.push({ type: 'log', level: 'warn', msg: `${this.describe(e.node)} reports that its guest crashed (${e.message}) while the pair is protecting: it is fenced if the secondary reaches COLO` });
          break;
        }
        // A secondary in COLO whose guest crashed (a trap only it took) is the primary's to
        // mend: its next checkpoint, asked for at once (colo/core.ts svmCrashed), replaces the
        // SVM's state, and the secondary can take over again. Killing it would only trade that
        // checkpoint for a whole new migration, and leave the pair unprotected meanwhile. One
        // that stays crashed (no checkpoint came: `stuck`) is fenced like a hung one.
        // One that crashes again and again (limits.upSecondaryCrashesMax) is replaced instead.
        if (e.stuck !== true && n?.alive === true && n.failure === undefined && this.secondary === n && (this.phase === 'protected' || this.phase === 'protecting')) {
          const windowMs = limits.upSecondaryCrashWindowMs;
          const recent = (n.crashedAt ?? []).filter((at) => at > e.at - windowMs);
          recent.push(e.at);
          n.crashedAt = recent.slice(-limits.upSecondaryCrashesMax);
          if (recent.length >= limits.upSecondaryCrashesMax) {
            const what = `guest crashed ${recent.length} times within ${windowMs / 1000} s`;
            this.fence(e.node, `${what}: ${e.message}`, `reports that its ${what} (last: ${e.message}); a new secondary replaces it`, out);
            break;
          }
          n.crashes = (n.crashes ?? 0) + 1;
          out.push({
            type: 'log',
            level: n.crashes === 1 ? 'info' : 'debug',
            msg: `${this.describe(e.node)} reports that its guest crashed (${e.message}); left running: the primary's checkpoint replaces its state`,
          });
          break;
        }
        this.fence(e.node, `guest crashed: ${e.message}`, `reports that its guest crashed (${e.message})`, out);
        break;
      }
      case 'guestShutdown':
        this.guestShutdown(e.node, e.code ?? null, out);
        break;
      case 'coloExit': {
        // Only a node leaving COLO on its own matters; in a failover the supervisor asked for it.
        // One that comes before the driver reports the protection complete waits for that report.
        if (this.phase === 'protecting' && (e.node === this.primary?.id || e.node === this.secondary?.id)) this.exitWhileProtecting ??= e;
        if (this.phase !== 'protected') break;
        if (this.secondary?.id === e.node && e.mode === 'secondary') {
          // It gave up (its apply broke off: colo/core.ts applyFailed) and can never take over.
          // Killing it now lets its exit run the usual failover, at once, instead of the
          // primary's holding replies for the grace period before it goes on alone.
          const s = this.secondary;
          if (s.failure !== undefined) break; // condemned already (also told twice: by its event, and by a catch-up after a lost QMP connection)
          out.push({ type: 'log', level: 'warn', msg: `secondary ${s.pid} left COLO by itself (reason ${e.reason}); killing it` });
          s.failure = `left COLO (reason ${e.reason})`;
          out.push({ type: 'kill', node: s.id, signal: 'SIGKILL' });
          break;
        }
        if (this.primary?.id !== e.node || e.mode !== 'primary') break;
        // A primary already condemned (its guest crashed, GUEST_PANICKED, then it leaves COLO)
        // does not go on: its death comes, and its secondary takes over.
        if (this.primary.failure !== undefined) break;
        const p = this.primary;
        const s = this.secondary!;
        if (e.guestDead === true && s.alive && s.failure === undefined) {
          // It failed over by itself (its link broke) and could not run its guest: it serves
          // nothing, and it dropped the output it held, so the secondary, at the last
          // checkpoint, takes over (its death brings the takeover).
          this.fence(p.id, `left COLO (reason ${e.reason}) and its guest does not run`, `left COLO by itself (reason ${e.reason}) and its guest does not run`, out);
          break;
        }
        if (!s.alive && s.guestExited === true) {
          // The secondary's guest exited and the primary's did not (colo/core.ts, after
          // limits.coloSvmExitWaitMs): the runs diverged; the primary serves on, alone.
          out.push({ type: 'log', level: 'warn', msg: `primary ${p.pid} left COLO (reason ${e.reason}): its guest did not exit as the secondary's did; the runs diverged` });
          out.push({ type: 'print', line: `pair: the guests diverged (the secondary's exited, the primary's runs on); primary ${p.pid} continues unprotected` });
          // The guests' doing, not a failure of the protection (it held until the secondary's
          // guest exited): no failed attempt, no pause. Each divergence takes a new protection
          // plus coloSvmExitWaitMs, so even a guest that diverges every time loops no faster.
          this.secondary = null;
          this.phase = 'unprotected';
          this.stable = true;
          this.reprotect(out);
          break;
        }
        out.push({ type: 'log', level: 'warn', msg: `primary ${p.pid} left COLO by itself (reason ${e.reason}); secondary ${s.pid} falls behind it: killing it` });
        out.push({ type: 'print', line: `pair: primary ${p.pid} left COLO (reason ${e.reason}); it continues unprotected` });
        s.failure = `out of date: primary ${p.pid} left COLO`;
        out.push({ type: 'kill', node: s.id, signal: 'SIGKILL' }, { type: 'discardDisk', node: s.id });
        // Its exit, when it comes, is that of a replaced node.
        this.secondary = null;
        this.phase = 'unprotected';
        // As after a failover: a cause that persists (the secondary refuses every state, the
        // link breaks at every checkpoint) would otherwise start secondaries without a pause.
        this.afterProtectionEnded(out);
        break;
      }
      case 'responsive': {
        const n = this.nodes.get(e.node);
        if (n?.alive === true && n.failure === undefined) out.push({ type: 'log', level: 'info', msg: `${this.describe(e.node)} answers again after ${e.ms} ms` });
        break;
      }
      case 'signal':
        if (this.phase === 'stopping' || this.phase === 'stopped') {
          for (const n of this.living) out.push({ type: 'kill', node: n.id, signal: 'SIGKILL' });
          break;
        }
        out.push({ type: 'print', line: `pair: stopping (${e.signal})` });
        this.stop(0, out);
        break;
      case 'timer':
        if (e.name === 'stable') {
          if (e.gen === this.protections && this.phase === 'protected') {
            this.stable = true;
            this.failures = 0;
          }
        } else if (e.name === 'svmExit') {
          // The primary neither exited nor left COLO after the secondary's guest exited (its
          // COLO_EXIT lost?): the secondary is gone all the same; the usual failover.
          const s = this.secondary;
          if (e.gen === this.protections && this.phase === 'protected' && s !== null && !s.alive && s.guestExited === true) {
            out.push({ type: 'log', level: 'warn', msg: `primary ${this.primary!.pid} neither exited nor left COLO within ${limits.upSvmGuestExitWaitMs} ms of the secondary's guest exit` });
            this.secondaryDied(s, out);
          }
        } else if (e.name === 'retry') {
          if (this.phase === 'unprotected' && this.secondary === null && this.primary?.alive === true) this.reprotect(out);
        } else if (this.phase === 'stopping') {
          for (const n of this.living) {
            // Said: a node that ignored SIGTERM (stopped, hung) is no clean stop, though the pair still ends
            // (a primary whose guest exited has its own line when it ends: see exited).
            if (n.id !== this.guestExitNode) out.push({ type: 'log', level: 'warn', msg: `${this.describe(n.id)} did not stop within ${this.stopTimeoutMs} ms of SIGTERM (stopped or hung): killing it (SIGKILL)` });
            out.push({ type: 'kill', node: n.id, signal: 'SIGKILL' });
          }
        }
        break;
    }
    this.forgetReplaced();
    return out;
  }

  /**
   * Forgets the dead nodes that are neither the primary nor the secondary: no event about them
   * changes anything any more, and their disk copies were discarded when they were replaced.
   * The driver forgets its handles to their processes with them (node() is undefined).
   */
  private forgetReplaced(): void {
    for (const n of this.nodes.values()) if (!n.alive && n !== this.primary && n !== this.secondary) this.nodes.delete(n.id);
  }

  private add(role: Role): NodeInfo {
    const n: NodeInfo = { id: this.nextId++, role, pid: null, ready: false, alive: true };
    this.nodes.set(n.id, n);
    return n;
  }

  private describe(id: number): string {
    const n = this.nodes.get(id);
    return n === undefined ? `node ${id}` : `${n.role} ${n.pid ?? `(node ${id})`}`;
  }

  private maybeProtect(out: PairAction[]): void {
    if (this.phase !== 'starting' && this.phase !== 'reprotecting') return;
    const p = this.primary;
    const s = this.secondary;
    if (p === null || s === null || !p.ready || !s.ready) return;
    this.phase = 'protecting';
    this.exitWhileProtecting = null;
    this.crashWhileProtecting = null;
    out.push({ type: 'log', level: 'info', msg: `protecting: migrating primary ${p.pid} into secondary ${s.pid} with x-colo` });
    out.push({ type: 'protect', primary: p.id, secondary: s.id });
  }

  /**
   * A failover, or the primary leaving COLO by itself, ended the protection: protect again at
   * once, unless it had lasted less than stableMs; then it counts as a failed attempt and waits
   * its turn (retry).
   */
  private afterProtectionEnded(out: PairAction[]): void {
    if (this.stable) {
      this.reprotect(out);
      return;
    }
    this.failures++;
    this.stable = true;
    this.secondary = null; // dead (or now the primary): the retry starts a new one
    this.retry(out, `the protection lasted less than ${this.stableMs / 1000} s: attempt ${this.failures} to protect it failed`);
  }

  private reprotect(out: PairAction[]): void {
    // Its guest crashed while a protection was under way, which then failed: no secondary took over.
    const crashed = this.primary?.guestCrashed;
    if (crashed !== undefined) {
      this.lost(`the guest of ${this.describe(this.primary!.id)} crashed (${crashed}) and no partner can take over`, out);
      return;
    }
    this.secondary = this.add('secondary');
    this.phase = 'reprotecting';
    out.push({ type: 'print', line: 'pair: re-protecting' });
    out.push({ type: 'spawn', node: this.secondary.id, role: 'secondary' });
  }

  /**
   * After a failed attempt (the secondary is gone): try again soon, with a growing pause; after
   * attemptsMax failures in a row, say so once and keep trying every retryLaterMs, so that a
   * cause that goes away (a full disk freed) ends with the pair protected again. Each wait is
   * one line: the pair is unprotected, and when the next attempt comes.
   */
  private retry(out: PairAction[], why?: string): void {
    const ms = this.failures >= this.attemptsMax ? this.retryLaterMs : this.retryDelayMs * this.failures;
    const because = why === undefined ? '' : `${why}; `;
    const line =
      this.failures === this.attemptsMax
        ? `pair: unprotected (primary ${this.primary!.pid}; ${because}gave up after ${this.failures} failed attempts to protect it; trying again every ${ms / 1000} s)`
        : `pair: unprotected (primary ${this.primary!.pid}; ${because}next protection attempt in ${ms / 1000} s)`;
    out.push({ type: 'print', line }, { type: 'setTimer', name: 'retry', ms });
  }

  private exited(id: number, code: number | null, signal: string | null, out: PairAction[]): void {
    const n = this.nodes.get(id);
    if (n === undefined || !n.alive) return;
    n.alive = false;
    // Neither known: a process that was never started, or one this supervisor adopted (not its
    // child: init reaps it, and its status, SIGKILL or a crash, is not seen). Not "exited": that
    // reads as a clean end, of a process that may well have been killed.
    const how = n.failure !== undefined ? `killed: ${n.failure}` : signal !== null ? signal : code !== null ? `exit code ${code}` : 'exit status unknown';
    n.ended = how;
    if (this.phase === 'stopping') {
      if (id === this.guestExitNode) {
        // Its process's status is the guest's; killed (stopTimeout) or adopted (no status
        // seen), the one its SHUTDOWN said; else unknown, and no success claimed: 1.
        if (code !== null) {
          this.exitCode = code;
        } else {
          this.exitCode = this.guestExitCode ?? 1;
          if (signal !== null) {
            const status = this.guestExitCode === null ? 'its status is unknown: colo up exits 1' : `colo up exits with the guest's status (${this.guestExitCode})`;
            out.push({ type: 'log', level: 'warn', msg: `primary ${n.pid} did not end by itself after its guest exited: ended by ${signal}; ${status}` });
          }
        }
      }
      if (this.living.length === 0) {
        this.phase = 'stopped';
        out.push({ type: 'print', line: 'pair: stopped' }, { type: 'exit', code: this.exitCode, primary: this.primary?.id ?? null });
      }
      return;
    }
    if (this.primary?.id === id) {
      if (this.phase === 'protected' && this.secondary?.alive === true) {
        this.phase = 'failover';
        this.cause = how;
        out.push({ type: 'log', level: 'warn', msg: `primary ${n.pid} died (${how}); secondary ${this.secondary.pid} takes over` });
        // Its disk stays until the takeover succeeded (tookOver): if the secondary dies or
        // fails too, that disk holds every acknowledged write, and becomes the --drive image.
        out.push({ type: 'takeover', node: this.secondary.id });
      } else {
        // A phase name reads as a state, except failover (its secondary had just died).
        const was = this.phase === 'failover' ? 'failing over to it' : this.phase;
        this.lost(`primary ${n.pid} died (${how}) while the pair was ${was}`, out);
      }
      return;
    }
    if (this.secondary?.id === id) {
      switch (this.phase) {
        case 'protected':
          if (n.guestExited === true && n.failure === undefined) this.svmGuestEnded(n, out);
          else this.secondaryDied(n, out);
          out.push({ type: 'discardDisk', node: id });
          break;
        case 'failover':
          // It was taking over.
          this.lost(`secondary ${n.pid} died (${how}) while taking over`, out);
          break;
        case 'protecting':
          // The migration fails on the primary; protectFailed follows and retries (or, had it
          // reached COLO before it died, protected follows, and the primary goes on alone).
          out.push({ type: 'log', level: 'warn', msg: `secondary ${n.pid} died (${how}) during the initial migration` });
          out.push({ type: 'discardDisk', node: id });
          break;
        case 'starting':
        case 'reprotecting':
          this.failures++;
          out.push({ type: 'print', line: `pair: unprotected (secondary ${n.pid ?? `(node ${id})`} exited before it was ready: ${how})` });
          out.push({ type: 'discardDisk', node: id });
          this.secondary = null;
          this.phase = 'unprotected';
          this.retry(out);
          break;
        case 'unprotected':
          // Killed after a failed attempt.
          out.push({ type: 'discardDisk', node: id });
          this.secondary = null;
          this.retry(out);
          break;
      }
      return;
    }
    // A node that was already replaced (e.g. a killed secondary): nothing to do.
  }

  /** The secondary `n` of a protected pair is dead: its primary continues alone. */
  private secondaryDied(n: NodeInfo, out: PairAction[]): void {
    this.phase = 'failover';
    this.cause = n.ended!;
    out.push({ type: 'log', level: 'warn', msg: `secondary ${n.pid} died (${this.cause}); primary ${this.primary!.pid} continues alone` });
    out.push({ type: 'continueAlone', node: this.primary!.id });
  }

  /**
   * The secondary `n` of a protected pair ended because its guest exited by itself: no death.
   * Its primary was told (GUEST_EXITED) and waits for its own guest's exit, the same run
   * behind (colo/core.ts): then the pair stops with the guest's status (guestShutdown).
   * Should its guest not exit within limits.coloSvmExitWaitMs, the runs diverged: it leaves
   * COLO by itself (coloExit) and is protected again. Telling it to go on alone now (as after a
   * death) would protect again a guest about to exit, or release its output uncompared.
   */
  private svmGuestEnded(n: NodeInfo, out: PairAction[]): void {
    const p = this.primary!;
    out.push({ type: 'log', level: 'info', msg: `secondary ${n.pid} ended as its guest exited (${n.ended}); primary ${p.pid} runs on to its own guest's exit` });
    out.push({
      type: 'print',
      line: `pair: the guest of secondary ${n.pid} exited (${n.ended}); waiting up to ${limits.coloSvmExitWaitMs / 1000} s for the guest of primary ${p.pid} to exit too`,
    });
    out.push({ type: 'setTimer', name: 'svmExit', ms: limits.upSvmGuestExitWaitMs, gen: this.protections });
  }

  /**
   * A node that lives on but cannot serve (hung, or its guest crashed) is killed when a partner
   * can carry on without it, so that its death runs the usual failover; `failure` names why.
   */
  private fence(id: number, failure: string, what: string, out: PairAction[]): void {
    const n = this.nodes.get(id);
    if (n === undefined || !n.alive || n.failure !== undefined || this.phase === 'stopping' || this.phase === 'stopped') return;
    // A secondary that is taking over (phase failover) is the only copy of the service now;
    // so is either node once the other is condemned already (both stalled at once, a host-wide
    // pause: killing both would end the service for what may be a blip).
    const fence =
      (this.secondary?.id === id && this.phase !== 'failover' && this.primary?.failure === undefined) ||
      (this.primary?.id === id && this.phase === 'protected' && this.secondary?.alive === true && this.secondary.failure === undefined);
    if (!fence) {
      out.push({ type: 'log', level: 'warn', msg: `${this.describe(id)} ${what}; left running: no partner can take over from it` });
      return;
    }
    n.failure = failure;
    out.push({ type: 'log', level: 'warn', msg: `${this.describe(id)} ${what}: killing it (SIGKILL) so that it can never serve again` });
    out.push({ type: 'kill', node: id, signal: 'SIGKILL' });
  }

  /**
   * The guest of the node that serves exited by itself (a poweroff, a batch job that ended):
   * the service ends by the guest's will, not by a failure. Its partner must not take over (it
   * would run the guest's last moments again, or report the service lost), so the pair stops,
   * with the guest's exit status, as QEMU's COLO shuts both nodes down on a guest shutdown.
   * A secondary's guest exiting is only that node's end (the primary's guest goes on, or exits
   * too): its death is the usual failover.
   */
  private guestShutdown(id: number, code: number | null, out: PairAction[]): void {
    const n = this.nodes.get(id);
    if (n === undefined || !n.alive || this.phase === 'stopping' || this.phase === 'stopped') return;
    // Only the primary: a secondary taking over whose guest exits dies while taking over, and
    // the dead primary's disk, at the last checkpoint, is then the one kept.
    if (this.primary?.id !== id) {
      if (n.guestExited === true) return; // heard on both QMP connections (the driver's and the heartbeat's)
      n.guestExited = true;
      out.push({ type: 'log', level: 'info', msg: `the guest of ${this.describe(id)} exited by itself` });
      return;
    }
    out.push({ type: 'log', level: 'info', msg: `the guest of ${this.describe(id)}, which serves, exited by itself: stopping the pair` });
    out.push({ type: 'print', line: `pair: stopping (the guest exited)` });
    this.guestExitNode = id;
    this.guestExitCode = code;
    // Not told SIGTERM: its process is ending by itself, and a signal that meets its teardown
    // (its handler gone) kills it, losing the guest's exit status. stopTimeout still kills it.
    this.stop(0, out, id);
  }

  /** The service cannot go on: stop whatever is left and exit with an error. */
  private lost(why: string, out: PairAction[]): void {
    out.push({ type: 'log', level: 'error', msg: `the service is lost: ${why}` });
    out.push({ type: 'print', line: `pair: failed (${why})` });
    this.stop(1, out);
  }

  private stop(code: number, out: PairAction[], ending?: number): void {
    this.phase = 'stopping';
    this.exitCode = code;
    const living = this.living;
    if (living.length === 0) {
      this.phase = 'stopped';
      out.push({ type: 'print', line: 'pair: stopped' }, { type: 'exit', code, primary: this.primary?.id ?? null });
      return;
    }
    for (const n of living) if (n.id !== ending) out.push({ type: 'kill', node: n.id, signal: 'SIGTERM' });
    out.push({ type: 'setTimer', name: 'stopTimeout', ms: this.stopTimeoutMs });
  }
}
