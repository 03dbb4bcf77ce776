/**
 * COLO's network drivers (ARCHITECTURE §5 "Network"): thin glue between the VM's front end,
 * the main channel and the pure compare (compare.ts).
 *
 * Primary: every client input event goes to the PVM (the front end does that) and is mirrored,
 * with the same sequence number, to the secondary; PVM output goes to the compare instead of
 * the clients; SVM output arrives from the secondary; what the compare releases goes to the
 * clients. Secondary: mirrored input goes to the SVM; SVM output goes back to the primary,
 * tagged with the checkpoint epoch it was produced in: written by the SVM's vCPU thread on the
 * output channel (output-channel.ts) once there is one, until then on the main channel.
 *
 * The mirror moves to the output channel too, where the SVM's vCPU reads it itself (the
 * secondary's main thread is then off the path of every request). It moves at a checkpoint's
 * capture, once the vCPU said it reads there (a mirror-ready batch): every input after the
 * capture is numbered above the state's, so the SVM, restored to that state, takes the
 * channel's input in order and drops what the state already has. Input never goes both ways
 * at once. If the channel breaks, the mirror goes back to the main channel, and a checkpoint
 * brings the SVM back in step (input lost on the way it never saw).
 *
 * SVM output that goes on the main channel after the channel broke on the secondary follows an
 * output-moved batch there. It is newer than what the channel may still deliver (written
 * before the break, not read yet), so the primary compares it only once it has read the
 * channel to its end: the two ways reach the compare in the order the SVM produced them, and
 * a break costs no mismatch.
 */
import type * as net from 'node:net';
import { StreamError, errorMessage } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { latencyTrace } from '../core/latency-trace.js';
import { logger } from '../core/log.js';
import type { Vm } from '../control/vm.js';
import type { IncomingSession, SourceSession } from '../migration/session.js';
import type { Frame } from '../migration/stream.js';
import type { ReadingPause } from '../net/frontend.js';
import type { NicInput, NicOutput } from '../net/nic.js';
import { Compare, type CompareResult, type CompareTrigger } from './compare.js';
import { ChannelFrameReader, decodeNetBatch, encodeChannelDropped, encodeInputFrames, encodeInputPressure, encodeInputs, encodeOutputMoved, encodeOutputs, encodeSvmCrashed } from './net-wire.js';
import { connectOutputChannel } from './output-channel.js';

const log = logger('colo');

/** The primary's reasons to stop reading its clients (the front end's 'vm' is the VM's own). */
type Hold = Exclude<ReadingPause, 'vm'>;

/** Collects events and flushes them once per event-loop turn. */
class Batcher<E> {
  private items: E[] = [];
  private scheduled = false;
  constructor(private readonly flushTo: (items: E[]) => void) {}
  push(e: E): void {
    this.items.push(e);
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => this.flush());
  }
  flush(): void {
    this.scheduled = false;
    if (this.items.length === 0) return;
    const items = this.items;
    this.items = [];
    this.flushTo(items);
  }
  drop(): void {
    this.items = [];
  }
}

export class PrimaryNet {
  readonly compare = new Compare(
    { timeoutMs: limits.coloCompareTimeoutMs, heldBytesMax: limits.coloCompareHeldBytesMax },
    (conn) => this.vm.frontEnd?.deliveredBytes(conn) ?? null,
    // Traced: a reply held back for the SVM's copy, as two events in a row (latency-anatomy).
    latencyTrace === null
      ? null
      : (pvmAt, svmAt) => {
          latencyTrace?.event('P:lateCopyFrom', performance.timeOrigin + pvmAt);
          latencyTrace?.event('P:lateCopyTo', performance.timeOrigin + svmAt);
        },
  );
  private active = false;
  /**
   * Aborted when COLO ends here: an output channel still connecting (a secondary that stopped
   * answering) would hold its socket and timer, and a quitting process, for
   * limits.coloOutputChannelTimeoutMs.
   */
  private readonly ending = new AbortController();
  private scan: NodeJS.Timeout | null = null;
  /**
   * Why client input is stopped (each a front-end reading pause): 'compare', the PVM's output
   * for the next epoch reached the held limit (boundHeld); 'mirror', the secondary left too much
   * mirrored input unread (boundMirror); 'svm-input', the secondary's SVM left too much
   * mirrored input untaken (an input-held batch).
   */
  private readonly holds = new Set<Hold>();
  private readonly mirror: Batcher<NicInput>;
  private outputChannel: net.Socket | null = null;
  /** Bytes that came over the SVM output channel. */
  outputChannelBytes = 0;
  /** Output channels given up because they delivered nothing (silentChannel). */
  outputChannelStalls = 0;
  /** outputChannelBytes at the last compare timeout, and the timeouts since through which it stayed so. */
  private silentMark = -1;
  private silentTimeouts = 0;
  /**
   * While the mirror is held on the output channel: its unsent bytes at their last fall, the
   * time since then outside checkpoints (stuckMs), and when last looked at (watchMirrorChannel).
   */
  private mirrorStuck: { unsent: number; stuckMs: number; at: number } | null = null;
  /** Whether the mirror hold was taken on the output channel (its release then may be the channel's end, not a catch-up). */
  private mirrorHeldOnChannel = false;
  /**
   * Where the mirror goes: the main channel ('main'); still there, but the SVM's vCPU reads the
   * output channel ('ready': moved at the next capture); the output channel ('channel').
   */
  private mirrorRoute: 'main' | 'ready' | 'channel' = 'main';
  /** Bytes of mirrored input sent over the output channel. */
  mirrorChannelBytes = 0;
  /**
   * SVM output that came on the main channel after an output-moved batch, while the output
   * channel is still open here: it waits, in arrival order, for the channel's end (null: the
   * output has not moved, or the channel has ended).
   */
  private moved: { epoch: number; events: NicOutput[]; at: number }[] | null = null;
  private movedBytes = 0;
  /** Ends the wait for the output channel's end after limits.coloOutputChannelDrainMs. */
  private drainTimer: NodeJS.Timeout | null = null;
  /** A wait for the PVM's held output to be matched (pvmOutputSettled): its end. */
  private settledWait: (() => void) | null = null;

  constructor(
    private readonly vm: Vm,
    private readonly session: SourceSession,
    private readonly onTrigger: (reason: CompareTrigger | 'resync' | 'svm-crashed') => void,
    /** SVM output that cannot be decoded: the secondary is not one to compare with. */
    private readonly onBroken: (err: Error) => void,
    /** Whether a checkpoint is under way (from its request to VMSTATE_LOADED): the SVM is paused for it. */
    private readonly checkpointing: () => boolean = () => false,
  ) {
    this.mirror = new Batcher((events) => {
      if (!this.active) return;
      latencyTrace?.event('P:mirror');
      const ch = this.outputChannel;
      if (this.mirrorRoute === 'channel' && ch !== null) {
        const b = encodeInputFrames(events);
        this.mirrorChannelBytes += b.byteLength;
        ch.write(b);
        this.boundMirror();
        return;
      }
      try {
        for (const p of encodeInputs(events)) this.session.sendColoNet(p);
      } catch (err) {
        // The channel is gone: the failover path handles it (the PVM already has the input).
        log.debug(`mirroring input: ${errorMessage(err)}`);
      }
      this.boundMirror();
    });
  }

  start(): void {
    this.active = true;
    this.vm.outputSink = (out) => {
      latencyTrace?.event('P:pvmOut');
      this.deliver(this.compare.pvm(out, performance.now()));
      this.boundHeld();
    };
    // Input numbered since the initial migration's switchover pause goes first: what the
    // state already holds the secondary drops by its number, the rest it needs.
    const early = this.vm.inputBacklog ?? [];
    this.vm.inputBacklog = null;
    this.vm.inputTap = (ev) => this.mirror.push(ev);
    for (const ev of early) this.mirror.push(ev);
    this.scan = setInterval(() => {
      const t = this.compare.check(performance.now());
      if (t !== null) this.triggered(t);
      // The main channel has no drain event of the mirror's own: whether the secondary caught up is looked at here.
      if (this.holds.has('mirror')) this.boundMirror();
      this.watchMirrorChannel();
    }, limits.coloCompareScanMs);
  }

  /**
   * The PVM's guest exited: resolves once the compare holds none of its output (the SVM's
   * copy came and released it, or a checkpoint in flight did), COLO ended here, or `ms`
   * passed, whichever comes first. Never rejects.
   */
  pvmOutputSettled(ms: number): Promise<void> {
    if (!this.active || !this.compare.holdsPvmOutput) return Promise.resolve();
    this.settledWait?.();
    return new Promise<void>((resolve) => {
      // Released output ends it at once (deliver); the scan covers releases that go elsewhere.
      const scan = setInterval(() => {
        if (!this.compare.holdsPvmOutput) end();
      }, limits.coloCompareScanMs);
      const timer = setTimeout(() => {
        log.info(`the guest exited; ${this.compare.held} bytes of its output held for the compare were not matched by the SVM's within ${ms} ms: dropped`);
        end();
      }, ms);
      const end = (): void => {
        clearInterval(scan);
        clearTimeout(timer);
        if (this.settledWait === end) this.settledWait = null;
        resolve();
      };
      this.settledWait = end;
    });
  }

  /** Whether SVM output comes over its own channel. */
  get outputChannelOpen(): boolean {
    return this.outputChannel !== null;
  }

  /** Whether mirrored input goes over the output channel. */
  get mirrorOnChannel(): boolean {
    return this.mirrorRoute === 'channel' && this.outputChannel !== null;
  }

  /**
   * CHECKPOINT_READY named the secondary's output channel port: connect it. Without one (or if
   * it cannot be had) SVM output keeps coming on the main channel.
   */
  async openOutputChannel(port: unknown): Promise<void> {
    if (port === undefined || !this.active) return;
    let s: net.Socket;
    try {
      s = await connectOutputChannel(this.session.opts.host, Number(port), this.session.migrationId, this.ending.signal);
    } catch (err) {
      if (this.active && this.session.failed === null) log.warn(`${errorMessage(err)}; SVM output comes on the main channel`);
      return;
    }
    if (!this.active || this.ending.signal.aborted) {
      s.destroy();
      return;
    }
    this.outputChannel = s;
    const reader = new ChannelFrameReader();
    s.on('data', (chunk: Buffer) => {
      this.outputChannelBytes += chunk.byteLength;
      latencyTrace?.event('P:svmOut');
      try {
        for (const p of reader.push(chunk)) this.onPayload(p, true);
      } catch (err) {
        s.destroy();
        if (this.active) this.onBroken(err instanceof Error ? err : new Error(String(err)));
      }
    });
    // Its end is the secondary's end or its switch back to the main channel: the main channel
    // says which (a failover, or nothing).
    s.on('error', (err) => log.debug(`SVM output channel: ${err.message}`));
    s.on('drain', () => this.boundMirror());
    s.on('close', () => this.channelEnded(s, false));
  }

  /** The output channel ended (or was given up: `silent`); the mirror goes on the main channel. */
  private channelEnded(s: net.Socket, silent: boolean): void {
    if (this.outputChannel !== s) return;
    this.outputChannel = null;
    const carried = this.mirrorRoute === 'channel';
    this.mirrorRoute = 'main';
    if ((carried || silent) && this.active) {
      // Input in flight there is lost (and output, if it went silent): the SVM may differ from
      // now on without its output showing it yet. A checkpoint brings it back in step.
      if (!silent) log.info('the SVM output channel closed; the mirror goes on the main channel, and a checkpoint resynchronises the SVM');
      this.onTrigger('resync');
    }
    // All the channel delivered has been compared: what came on the main channel since the
    // secondary moved its output there is next.
    this.compareMoved();
  }

  private triggered(t: CompareTrigger): void {
    this.onTrigger(t);
    if (t === 'timeout') this.silentChannel();
  }

  /**
   * A compare timeout (a checkpoint follows). While the output channel carries the SVM's output
   * (its vCPU's mirror-ready came there first), nothing at all on it through
   * limits.coloOutputChannelSilentTimeouts timeouts in a row is a channel that went silent (a
   * path that forwards nothing but stays open): every request would wait for a timeout
   * checkpoint, for good. The primary gives it up: it tells the secondary on the main channel
   * (before any mirrored input goes there: input batched now follows), closes its end, and compares what comes on the main
   * channel from now on; a checkpoint makes good what was lost on the channel. An SVM that
   * truly produced nothing meanwhile only loses the channel, not its protection.
   */
  private silentChannel(): void {
    const s = this.outputChannel;
    if (s === null || !this.active) return;
    if (this.outputChannelBytes !== this.silentMark) {
      this.silentMark = this.outputChannelBytes;
      this.silentTimeouts = 0;
      return;
    }
    this.silentTimeouts += 1;
    if (this.silentTimeouts < limits.coloOutputChannelSilentTimeouts) return;
    log.warn(`the SVM output channel delivered nothing through ${this.silentTimeouts} compare timeouts in a row (a silent network path?): given up; SVM output and the mirror go on the main channel`);
    this.giveUpChannel(s);
  }

  /**
   * The mirror's direction of the output channel alone can stall (a path that forwards only
   * the other way): SVM output that comes by itself keeps the channel from looking silent, and
   * bulk input fills the socket past limits.coloMirrorUnsentBytesMax, which holds the clients
   * until the secondary takes half of it, which it never does: the clients waited for good,
   * through every checkpoint. Held so, with not one byte taken for
   * limits.coloMirrorChannelStuckMs, the channel is given up as a silent one is; the mirror goes
   * on the main channel (the hold then looks at that), and a checkpoint makes good what the
   * channel kept. The time of checkpoints does not count: the SVM paused for one reads nothing
   * (its vCPU reads the channel only while the guest waits for input), and the hold asks for
   * one, which a slow path back or a large state can keep for longer than the bound.
   */
  private watchMirrorChannel(): void {
    const s = this.outputChannel;
    if (s === null || !this.active || this.mirrorRoute !== 'channel' || !this.holds.has('mirror')) {
      this.mirrorStuck = null;
      return;
    }
    const unsent = s.writableLength;
    const now = performance.now();
    const st = this.mirrorStuck;
    if (st === null || unsent < st.unsent) {
      this.mirrorStuck = { unsent, stuckMs: 0, at: now };
      return;
    }
    if (!this.checkpointing()) st.stuckMs += now - st.at;
    st.at = now;
    if (st.stuckMs < limits.coloMirrorChannelStuckMs) return;
    this.mirrorStuck = null;
    log.warn(`the secondary took no byte of the ${unsent} bytes of mirrored input on the SVM output channel for ${limits.coloMirrorChannelStuckMs} ms of its SVM running (a silent network path?): given up; SVM output and the mirror go on the main channel`);
    this.giveUpChannel(s);
  }

  /** Give the output channel up (silent, or stuck one way): tell the secondary on the main channel, then close it. */
  private giveUpChannel(s: net.Socket): void {
    this.outputChannelStalls += 1;
    try {
      this.session.sendColoNet(encodeChannelDropped());
    } catch (err) {
      log.debug(`sending channel-dropped: ${errorMessage(err)}`);
    }
    this.channelEnded(s, true);
    s.destroy();
    // The hold looks at the main channel's unsent bytes from now on.
    this.boundMirror();
  }

  /**
   * The secondary's output comes on the main channel from now on (its vCPU gave up the output
   * channel). Until the channel ends here, what it still delivers is older: later output on
   * the main channel waits for that end, which normally follows at once (the secondary closed
   * its side), else for at most limits.coloOutputChannelDrainMs, when this side closes it.
   */
  private outputMoved(): void {
    const s = this.outputChannel;
    if (!this.active || s === null || this.moved !== null) return;
    this.moved = [];
    this.drainTimer = setTimeout(() => {
      this.drainTimer = null;
      log.info(`the SVM output channel did not end within ${limits.coloOutputChannelDrainMs} ms after the secondary moved its output to the main channel: closed`);
      s.destroy();
    }, limits.coloOutputChannelDrainMs);
  }

  /** The output channel ended: compare the SVM output that waited for it, in arrival order. */
  private compareMoved(): void {
    const moved = this.moved;
    this.moved = null;
    this.movedBytes = 0;
    if (this.drainTimer !== null) clearTimeout(this.drainTimer);
    this.drainTimer = null;
    if (moved === null || !this.active) return;
    for (const b of moved) for (const out of b.events) this.deliver(this.compare.svm(b.epoch, out, b.at));
    this.boundHeld();
  }

  /** A coloNet frame from the secondary: SVM output. */
  onFrame(f: Frame): void {
    latencyTrace?.event('P:svmMain');
    this.onPayload(f.payload, false);
  }

  private onPayload(payload: Buffer, onChannel: boolean): void {
    const batch = decodeNetBatch(payload);
    if (batch.type === 'mirror-ready' && onChannel) {
      if (this.mirrorRoute === 'main') this.mirrorRoute = 'ready';
      return;
    }
    if (batch.type === 'output-moved' && !onChannel) {
      this.outputMoved();
      return;
    }
    if (batch.type === 'svm-crashed' && !onChannel) {
      if (!this.active) return;
      log.debug('the SVM\'s guest crashed on the secondary: a checkpoint replaces it');
      this.onTrigger('svm-crashed');
      return;
    }
    if ((batch.type === 'input-held' || batch.type === 'input-free') && !onChannel) {
      this.svmInputPressure(batch.type === 'input-held');
      return;
    }
    if (batch.type !== 'output') throw new StreamError('FRAME_INVALID', `coloNet: the secondary sent a ${batch.type} batch`);
    if (!this.active) return;
    const now = performance.now();
    if (!onChannel && this.moved !== null) {
      this.moved.push({ epoch: batch.epoch, events: batch.events, at: now });
      for (const out of batch.events) if (out.kind === 'out') this.movedBytes += out.bytes.byteLength;
      // Bounded as the compare's own held output: past the limit the channel's rest is not waited for.
      if (this.movedBytes > limits.coloCompareHeldBytesMax) this.outputChannel?.destroy();
      this.boundHeld();
      return;
    }
    for (const out of batch.events) this.deliver(this.compare.svm(batch.epoch, out, now));
    this.boundHeld();
  }

  /**
   * Output held for the compare must not grow without bound when no checkpoint can release it:
   * one that does not come through (a secondary that stopped answering, or whose apply hangs,
   * with no manager to declare it lost), or a PVM stopped while the SVM runs on. Past the limit
   * (where the compare also asks for a checkpoint) the clients are not read, as they were not
   * while the PVM was paused; they are again once a checkpoint or matching output brought it
   * down to half.
   */
  private boundHeld(): void {
    const held = this.compare.held + this.movedBytes;
    if (!this.holds.has('compare') && held > limits.coloCompareHeldBytesMax) {
      this.hold('compare');
      log.info(`output held for the compare passed ${limits.coloCompareHeldBytesMax} bytes: clients are not read until a checkpoint or the other guest's output releases it`);
    } else if (this.holds.has('compare') && held <= limits.coloCompareHeldBytesMax / 2) this.release('compare');
  }

  /**
   * The checkpoint in flight captured the PVM's state and the PVM runs on before the secondary
   * has it: what the PVM produces from now on belongs to the next epoch.
   */
  pvmNextEpoch(): void {
    if (!this.active) return;
    this.compare.pvmNextEpoch();
    if (this.mirrorRoute === 'ready' && this.outputChannel !== null) {
      // Input numbered so far is in the state just captured: it still goes the old way (the
      // restored SVM drops it); all later input goes on the channel.
      this.mirror.flush();
      this.mirrorRoute = 'channel';
    }
  }

  /**
   * VMSTATE_RECEIVED: the SVM is about to equal the PVM at its pause; release what the PVM
   * produced before it (and what of the next epoch both already produced alike).
   */
  checkpoint(): void {
    if (!this.active) return;
    this.deliver(this.compare.checkpoint());
    this.boundHeld();
  }

  /**
   * VMSTATE_LOADED: the SVM runs the checkpoint's state. Output of the new epoch waits for the
   * other guest's from now on, not from VMSTATE_RECEIVED: a slow apply is no timeout.
   */
  svmResumed(): void {
    if (!this.active) return;
    this.compare.svmResumed(performance.now());
  }

  private hold(why: Hold): void {
    this.holds.add(why);
    this.vm.frontEnd?.pauseReading(why);
  }

  private release(why: Hold): void {
    if (!this.holds.delete(why)) return;
    this.vm.frontEnd?.resumeReading(why);
  }

  private releaseHolds(): void {
    for (const why of [...this.holds]) this.release(why);
  }

  /**
   * The secondary reads the main channel on whatever its SVM takes (checkpoints come on it),
   * so a PVM that takes input faster than the SVM would pile the difference up in the
   * secondary's memory, out of boundMirror's sight. It says when that passed
   * limits.coloSvmInputPendingBytesMax: the clients are not read, and a checkpoint (which
   * brings the SVM up to the PVM, the input before it dropped) is asked for; they are read
   * again once it says it is down to half.
   */
  private svmInputPressure(held: boolean): void {
    if (!this.active) return;
    if (held && !this.holds.has('svm-input')) {
      this.hold('svm-input');
      log.info(`the SVM has more than ${limits.coloSvmInputPendingBytesMax} bytes of mirrored input untaken on the secondary: clients are not read until it has taken half of them`);
      this.onTrigger('resync');
    } else if (!held && this.holds.has('svm-input')) {
      this.release('svm-input');
      log.info('the SVM took the mirrored input left on the secondary: clients are read again');
    }
  }

  /** Mirrored input written here that the secondary has not read yet (what its socket still holds). */
  private mirrorUnsent(): number {
    const ch = this.outputChannel;
    return this.mirrorRoute === 'channel' && ch !== null ? ch.writableLength : this.session.mainUnsentBytes;
  }

  /**
   * The mirror must not grow the primary's memory without bound: the PVM takes its input as it
   * comes, but a secondary that hangs, or whose SVM reads no input (its NIC queue is full, its
   * vCPU stops reading the output channel), leaves it in the socket. Past
   * limits.coloMirrorUnsentBytesMax the clients are not read, and a checkpoint is asked for (it
   * brings an SVM that fell behind up to the PVM, which reads its input); they are read again
   * once the secondary took half of it.
   */
  private boundMirror(): void {
    if (!this.active) return;
    const unsent = this.mirrorUnsent();
    if (!this.holds.has('mirror') && unsent > limits.coloMirrorUnsentBytesMax) {
      this.hold('mirror');
      this.mirrorHeldOnChannel = this.mirrorRoute === 'channel';
      log.info(`the secondary has ${unsent} bytes of mirrored input unread, above ${limits.coloMirrorUnsentBytesMax}: clients are not read until it has taken half of them`);
      this.onTrigger('resync');
    } else if (this.holds.has('mirror') && unsent <= limits.coloMirrorUnsentBytesMax / 2) {
      this.release('mirror');
      if (this.mirrorHeldOnChannel && this.mirrorRoute !== 'channel') {
        // The input left on the channel was dropped with it, not taken: a checkpoint makes it good.
        log.info(`the mirror moved to the main channel (the SVM output channel is gone), which has ${unsent} bytes of it unread: clients are read again`);
      } else {
        log.info('the secondary caught up with the mirrored input: clients are read again');
      }
    }
  }

  /**
   * Failover: release everything held, stop mirroring; output goes straight to the clients
   * (the PVM's is all there is now).
   */
  stop(): void {
    if (!this.end()) return;
    this.vm.outputSink = null;
    for (const out of this.compare.releaseAll()) this.vm.frontEnd?.deliver(out);
    this.releaseHolds();
  }

  /**
   * Process exit (or a PVM whose guest crashed): stop mirroring and drop what is held, and what
   * the PVM still produces until the machine is gone, as QEMU drops colo-compare's queues at
   * exit. None of it was produced by the SVM or covered by a checkpoint, and a supervisor
   * takes any end of the primary for its death: the secondary takes over from the last
   * checkpoint, which a reply released now could contradict (invariant 1). Only a failover
   * (stop()) or a checkpoint releases.
   */
  discard(): void {
    if (!this.end()) return;
    this.vm.outputSink = () => undefined;
    const dropped = this.compare.dropAll();
    if (dropped > 0) log.debug(`dropped ${dropped} bytes of output held for the compare`);
    this.releaseHolds();
  }

  /**
   * A failover began: the secondary is gone for good, but the output held for the compare
   * waits for the PVM to run on (stop) or to be dropped (discard), which can take a checkpoint
   * in flight's end. Meanwhile nothing goes to the secondary any more: no mirroring (each batch
   * a write to closed channels), no compare scan (its triggers do nothing now), no output
   * channel (nor one still connecting). The compare goes on holding what the PVM sends.
   */
  detach(): void {
    if (!this.active) return;
    this.ending.abort();
    this.outputChannel?.destroy();
    this.outputChannel = null;
    // The SVM output that waited for that channel's end is dropped with it (end: compareMoved).
    if (this.drainTimer !== null) clearTimeout(this.drainTimer);
    this.drainTimer = null;
    if (this.scan !== null) clearInterval(this.scan);
    this.scan = null;
    this.mirror.drop();
    this.vm.inputTap = null;
  }

  /** No more comparing or mirroring; false if that was so already. */
  private end(): boolean {
    if (!this.active) return false;
    this.detach();
    this.active = false;
    this.compareMoved();
    this.settledWait?.();
    return true;
  }

  private deliver(r: CompareResult): void {
    // An index loop: the shared empty result is a frozen array, which for-of would walk with an
    // iterator object per call.
    const release = r.release;
    for (let i = 0; i < release.length; i++) this.vm.frontEnd?.deliver(release[i]!);
    if (r.trigger !== null) this.triggered(r.trigger);
    // The guest exited and its process waits for this: it may end at once.
    if (this.settledWait !== null && release.length > 0 && !this.compare.holdsPvmOutput) this.settledWait();
  }
}

export class SecondaryNet {
  /** Checkpoints applied: the epoch SVM output is produced in. */
  epoch = 0;
  private active = false;
  private readonly outputs: Batcher<NicOutput>;
  /**
   * The primary was told the SVM has too much mirrored input untaken (input-held): looks every
   * limits.coloCompareScanMs whether it is down to half (the SVM took it, or an apply dropped
   * what the checkpoint's state had), to say input-free.
   */
  private inputHeld: NodeJS.Timeout | null = null;
  private readonly onDirectFailed = (message: string): void => {
    // The primary closed it, or is gone (then the main channel breaks too and a failover follows).
    log.info(`the SVM output channel closed (${message}); SVM output goes on the main channel`);
    if (!this.active) return;
    // The vCPU posts its output from now on (starting with the batch the break tore, whole).
    // The primary may not have read all the channel carried yet: it is told, so that it
    // compares what comes here after what the channel still delivers.
    this.outputs.flush();
    try {
      this.session.sendColoNet(encodeOutputMoved());
    } catch (err) {
      log.debug(`sending output-moved: ${errorMessage(err)}`);
    }
  };

  constructor(private readonly vm: Vm, private readonly session: IncomingSession) {
    this.outputs = new Batcher((events) => {
      if (!this.active) return;
      try {
        for (const p of encodeOutputs(this.epoch, events)) this.session.sendColoNet(p);
      } catch (err) {
        log.debug(`sending SVM output: ${errorMessage(err)}`);
      }
    });
  }

  /**
   * The SVM is paused. Returns the port of the SVM output channel for CHECKPOINT_READY (null:
   * there is none; output goes on the main channel).
   */
  async start(): Promise<number | null> {
    this.active = true;
    this.vm.outputSink = (out) => {
      if (this.active) this.outputs.push(out);
    };
    const m = this.vm.machine;
    m.on('direct-output-failed', this.onDirectFailed);
    const id = this.session.migrationId;
    if (id === null) return null;
    m.setOutputEpoch(this.epoch);
    try {
      return await m.openOutputChannel(this.session.localHost, id);
    } catch (err) {
      log.warn(`${errorMessage(err)}; SVM output goes on the main channel`);
      return null;
    }
  }

  /** Send the SVM output batched so far now (its guest exited: the process ends before the batch's turn). */
  flush(): void {
    this.outputs.flush();
  }

  /** The SVM's guest crashed: ask the primary for a checkpoint (on the main channel). */
  svmCrashed(): void {
    if (!this.active) return;
    try {
      this.session.sendColoNet(encodeSvmCrashed());
    } catch (err) {
      log.debug(`sending svm-crashed: ${errorMessage(err)}`);
    }
  }

  /** A coloNet frame from the primary: mirrored client input for the SVM. */
  onFrame(f: Frame): void {
    const batch = decodeNetBatch(f.payload);
    if (batch.type === 'channel-dropped') {
      if (!this.active) return;
      // The primary closed its end already (what the channel still carries it does not read),
      // and mirrored input comes here after this: the vCPU leaves the channel at its next
      // write or input wait, and posts its output.
      log.info('the primary gave the SVM output channel up (it delivered nothing); SVM output goes on the main channel');
      this.outputs.flush();
      this.vm.machine.stopDirectOutput();
      return;
    }
    if (batch.type !== 'input') throw new StreamError('FRAME_INVALID', `coloNet: the primary sent a ${batch.type} batch`);
    if (!this.active) return;
    latencyTrace?.event('S:mirrorIn');
    // Input the loaded NIC state already has (sequence number ≤ its last) is dropped by the NIC.
    for (const ev of batch.events) this.vm.machine.injectInput(ev);
    this.boundInput();
  }

  /**
   * Mirrored input waits in this process until the SVM takes it, and this channel is read on
   * regardless (checkpoints come on it): an SVM that takes input slower than the PVM, or not at
   * all, must not grow the secondary's memory by what the clients send. Past
   * limits.coloSvmInputPendingBytesMax the primary is told to stop reading its clients (and
   * takes a checkpoint); what it had already sent still comes, and none of it is dropped.
   */
  private boundInput(): void {
    if (this.inputHeld !== null || this.vm.machine.pendingInputBytes <= limits.coloSvmInputPendingBytesMax) return;
    if (!this.sendPressure(true)) return;
    log.info(`the SVM has ${this.vm.machine.pendingInputBytes} bytes of mirrored input untaken, above ${limits.coloSvmInputPendingBytesMax}: the primary stops reading its clients until it has taken half of them`);
    this.inputHeld = setInterval(() => {
      if (!this.active) {
        this.endInputHeld();
        return;
      }
      if (this.vm.machine.pendingInputBytes > limits.coloSvmInputPendingBytesMax / 2) return;
      this.endInputHeld();
      this.sendPressure(false);
    }, limits.coloCompareScanMs);
  }

  private endInputHeld(): void {
    if (this.inputHeld !== null) clearInterval(this.inputHeld);
    this.inputHeld = null;
  }

  private sendPressure(held: boolean): boolean {
    try {
      this.session.sendColoNet(encodeInputPressure(held));
      return true;
    } catch (err) {
      // The channel is gone: a failover follows, which ends the primary's hold too.
      log.debug(`sending input-${held ? 'held' : 'free'}: ${errorMessage(err)}`);
      return false;
    }
  }

  /**
   * The apply ran restoreVcpu and is about to run the SVM: output from now on is a new epoch
   * (and goes on the output channel if the primary connected it since the last apply).
   */
  nextEpoch(): void {
    // Output still batched was produced before the checkpoint: the primary drops it anyway.
    this.outputs.drop();
    this.epoch += 1;
    this.vm.machine.setOutputEpoch(this.epoch);
  }

  /** Takeover: SVM output goes to this node's own front end. */
  stop(): void {
    this.active = false;
    this.endInputHeld();
    this.outputs.drop();
    this.vm.outputSink = null;
    this.vm.machine.off('direct-output-failed', this.onDirectFailed);
    this.vm.machine.stopDirectOutput();
  }
}
