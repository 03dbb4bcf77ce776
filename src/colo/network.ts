/**
 * COLO's network drivers (ARCHITECTURE §5 "Network"): thin glue between the VM's front end,
 * the main channel and the pure compare (compare.ts).
 *
 * Primary: every client input event goes to the PVM (the front end does that) and is mirrored,
 * with the same sequence number, to the secondary; PVM output goes to the compare instead of
 * the clients; SVM output arrives from the secondary; what the compare releases goes to the
 * clients. Secondary: mirrored input goes to the SVM; SVM output goes back to the primary,
 * tagged with the checkpoint epoch it was produced in.
 */
import { StreamError, errorMessage } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { logger } from '../core/log.js';
import type { Vm } from '../control/vm.js';
import type { IncomingSession, SourceSession } from '../migration/session.js';
import type { Frame } from '../migration/stream.js';
import type { NicInput, NicOutput } from '../net/nic.js';
import { Compare, type CompareResult, type CompareTrigger } from './compare.js';
import { decodeNetBatch, encodeInputs, encodeOutputs } from './net-wire.js';

const log = logger('colo');

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
    (conn) => this.vm.frontEnd?.deliveredBytes(conn) ?? 0,
  );
  private active = false;
  private scan: NodeJS.Timeout | null = null;
  private readonly mirror: Batcher<NicInput>;

  constructor(
    private readonly vm: Vm,
    private readonly session: SourceSession,
    private readonly onTrigger: (reason: CompareTrigger) => void,
  ) {
    this.mirror = new Batcher((events) => {
      if (!this.active) return;
      try {
        for (const p of encodeInputs(events)) this.session.sendColoNet(p);
      } catch (err) {
        // The channel is gone: the failover path handles it (the PVM already has the input).
        log.debug(`mirroring input: ${errorMessage(err)}`);
      }
    });
  }

  start(): void {
    this.active = true;
    this.vm.outputSink = (out) => this.deliver(this.compare.pvm(out, performance.now()));
    this.vm.inputTap = (ev) => this.mirror.push(ev);
    this.scan = setInterval(() => {
      const t = this.compare.check(performance.now());
      if (t !== null) this.onTrigger(t);
    }, limits.coloCompareScanMs);
  }

  /** A coloNet frame from the secondary: SVM output. */
  onFrame(f: Frame): void {
    const batch = decodeNetBatch(f.payload);
    if (batch.type !== 'output') throw new StreamError('FRAME_INVALID', 'coloNet: the secondary sent input events');
    if (!this.active) return;
    const now = performance.now();
    for (const out of batch.events) this.deliver(this.compare.svm(batch.epoch, out, now));
  }

  /** VMSTATE_RECEIVED: the SVM is about to equal the PVM; release what the PVM produced. */
  checkpoint(): void {
    if (!this.active) return;
    for (const out of this.compare.checkpoint()) this.vm.frontEnd?.deliver(out);
  }

  /** Failover (or exit): release everything held, stop mirroring, output goes straight to the clients. */
  stop(): void {
    if (!this.active) return;
    this.active = false;
    if (this.scan !== null) clearInterval(this.scan);
    this.scan = null;
    this.mirror.drop();
    this.vm.inputTap = null;
    this.vm.outputSink = null;
    for (const out of this.compare.releaseAll()) this.vm.frontEnd?.deliver(out);
  }

  private deliver(r: CompareResult): void {
    for (const out of r.release) this.vm.frontEnd?.deliver(out);
    if (r.trigger !== null) this.onTrigger(r.trigger);
  }
}

export class SecondaryNet {
  /** Checkpoints applied: the epoch SVM output is produced in. */
  epoch = 0;
  private active = false;
  private readonly outputs: Batcher<NicOutput>;

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

  start(): void {
    this.active = true;
    this.vm.outputSink = (out) => {
      if (this.active) this.outputs.push(out);
    };
  }

  /** A coloNet frame from the primary: mirrored client input for the SVM. */
  onFrame(f: Frame): void {
    const batch = decodeNetBatch(f.payload);
    if (batch.type !== 'input') throw new StreamError('FRAME_INVALID', 'coloNet: the primary sent output events');
    if (!this.active) return;
    // Input the loaded NIC state already has (sequence number ≤ its last) is dropped by the NIC.
    for (const ev of batch.events) this.vm.machine.injectInput(ev);
  }

  /** The apply is about to run the SVM from the checkpoint: output from now on is a new epoch. */
  nextEpoch(): void {
    // Output still batched was produced before the checkpoint: the primary drops it anyway.
    this.outputs.drop();
    this.epoch += 1;
  }

  /** Takeover: SVM output goes to this node's own front end. */
  stop(): void {
    this.active = false;
    this.outputs.drop();
    this.vm.outputSink = null;
  }
}
