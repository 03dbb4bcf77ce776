/**
 * The vCPU: one worker thread that runs the instrumented guest on the shared guest memory.
 *
 * Device input is pulled from a shared ring (input-ring.ts) and waits are Atomics.wait on the
 * control block, so the guest runs without the worker's event loop. A pause request makes the
 * guest unwind (asyncify) at its next safe point; `_start` then returns, and the worker is back
 * in its event loop, answering save/restore/run messages.
 *
 * One exception: a COLO secondary's vCPU that holds the SVM output channel also reads mirrored
 * input from it (colo/output-channel.ts), and only the event loop sees a socket. There, a guest
 * that waits for input unwinds too, and the vCPU waits in its event loop for the socket, the
 * control block (Atomics.waitAsync) or the guest's timeout, then rewinds the guest. The guest's
 * clock runs on through these waits: to the guest they are a blocking call, not a pause.
 */
import { parentPort } from 'node:worker_threads';
import { writeSync } from 'node:fs';
import type { Socket } from 'node:net';
import { ChannelFrameReader, decodeNetBatch, encodeMirrorReady, encodeOutputFrames } from '../colo/net-wire.js';
import { OutputListener } from '../colo/output-channel.js';
import { InputRingReader } from './input-ring.js';
import { Nic, type NicInput, type NicOutput } from '../net/nic.js';
import { Disk, type DiskSpec } from '../block/disk.js';
import { Clock } from './devices/clock.js';
import { Serial } from './devices/serial.js';
import { WasiHost } from './wasi-host.js';
import { ProcExit } from './wasi-abi.js';
import { ctl, encodeOutputBatch, floatGlobalBits, floatGlobalValue, type GuestLayout, type VcpuState, type WorkerReply, type WorkerRequest } from './vcpu-protocol.js';
import { RestoreError } from '../core/errors.js';
import { RegionLock, growGuestMemory, regionAfterRestore, regionAt, type ReservedRegion } from './reserved-region.js';
import * as v from '../core/validate.js';
import { limits } from '../core/limits.js';
import { SharedTraceLog, observeGc, vcpuTrace } from '../core/latency-trace.js';

/** A credits-only 'out' message carries no events. */
const noOutput = new Uint8Array(0);

interface AsyncifyExports {
  _start(): void;
  asyncify_start_unwind(p: number): void;
  asyncify_stop_unwind(): void;
  asyncify_start_rewind(p: number): void;
  asyncify_stop_rewind(): void;
  asyncify_get_state(): number;
}

type Phase = 'fresh' | 'unwound' | 'running' | 'exited' | 'panicked';

class Vcpu {
  private readonly ctl: Int32Array;
  private readonly nic = new Nic();
  private readonly clock = new Clock();
  private readonly serial: Serial;
  private readonly disk: Disk | null;
  private readonly host: WasiHost;
  private readonly instance: WebAssembly.Instance;
  private readonly exports: AsyncifyExports;
  private readonly layout: GuestLayout;
  private phase: Phase = 'fresh';
  private lastWake = 0;
  private readonly pagesGlobal: WebAssembly.Global;
  /** colo$budget (instrument.ts): the preemption checks count it down; at 0 the next loop back-edge or call preempts (null: the guest has none). */
  private readonly budget: WebAssembly.Global | null;
  /** Where the dirty map is (with the guest's size, setGuestPages): markWrite runs on every host write. */
  private dirtyLogBase = 0;
  private readonly logGlobal: WebAssembly.Global | null;
  private readonly regionLock: RegionLock;
  private logU8: Uint8Array | null = null;
  private logBufferLength = -1;
  private pendingOut: NicOutput[] = [];
  /** Disk writes fail for want of space, from the first failure until one goes through. */
  private diskFull = false;
  /** This wait was reported to the main thread (io-error) and stopped the guest's clock. */
  private ioReported = false;

  private readonly input: InputRingReader;
  /** COLO_TRACE_DIR: this thread's trace, which the main thread writes with its own. */
  private readonly trace: SharedTraceLog | null;
  /** Ring input a save took in that the NIC had no room for: it is in the state, and drainInput gives it to the NIC first. */
  private overflow: NicInput[] = [];
  private readonly enqueue = (ev: NicInput): void => {
    this.nic.enqueue(ev);
  };

  constructor(private readonly memory: WebAssembly.Memory, init: Extract<WorkerRequest, { type: 'init' }>) {
    this.input = new InputRingReader(init.inputRing);
    const trace = init.trace === null ? null : new SharedTraceLog(init.trace);
    this.trace = trace;
    if (trace !== null) {
      observeGc((start, end) => {
        trace.record(vcpuTrace.gc, start);
        trace.record(vcpuTrace.gcEnd, end);
      });
    }
    this.ctl = new Int32Array(init.ctl);
    this.layout = init.layout;
    this.serial = new Serial(init.serialFd, (report) => post({ type: 'serial', report }));
    this.disk = init.disk === null ? null : Disk.attach(init.disk as DiskSpec);
    this.host = new WasiHost(memory, this, { clock: this.clock, serial: this.serial, nic: this.nic, disk: this.disk }, init.args, init.env);
    this.instance = new WebAssembly.Instance(init.module, {
      env: { memory },
      colo: { preempt: () => this.preempt(), grow: (delta: number) => this.grow(delta) },
      wasi_snapshot_preview1: this.host.imports() as unknown as WebAssembly.ModuleImports,
    });
    this.exports = this.instance.exports as unknown as AsyncifyExports;
    const budget = this.instance.exports['colo$budget'];
    // Without it the guest has no loop (no preemption check at all): its calls are bounded in number.
    this.budget = budget instanceof WebAssembly.Global ? budget : null;
    if (this.budget !== null) this.budget.value = init.layout.preemptBudget;
    // The guest's size (memory.size) and, above it, colo's region (reserved-region.ts).
    const pages = this.instance.exports['colo$pages'];
    if (!(pages instanceof WebAssembly.Global)) throw new Error('the instrumented guest does not export colo$pages');
    this.pagesGlobal = pages;
    const log = this.instance.exports['colo$dirtylog'];
    this.logGlobal = log instanceof WebAssembly.Global ? log : null;
    this.regionLock = new RegionLock(this.ctl, ctl.regionLock);
    this.setGuestPages(init.layout.initialPages);
  }

  /** The guest's size in wasm pages: colo's region lies right above. */
  private guestPages(): number {
    return this.pagesGlobal.value as number;
  }

  /** Where colo's region is now. */
  private region(): ReservedRegion {
    return regionAt(this.layout, this.guestPages());
  }

  /** The guest's size is `pages`: memory.size, the store log's map and the main thread's copy follow. */
  private setGuestPages(pages: number): void {
    this.pagesGlobal.value = pages;
    this.host.setGuestBytes(pages * limits.wasmPageBytes);
    this.dirtyLogBase = regionAt(this.layout, pages).dirtyLogBase;
    if (this.logGlobal !== null) this.logGlobal.value = this.dirtyLogBase;
    Atomics.store(this.ctl, ctl.guestPages, pages);
  }

  /** The guest's memory.grow (colo.grow): the region moves up, the guest gets what it asked for. */
  private grow(delta: number): number {
    return this.regionLock.with(() => {
      const before = this.guestPages();
      const after = growGuestMemory(this.memory, this.layout, before, delta);
      if (after < 0) return -1;
      this.setGuestPages(after);
      return before;
    });
  }

  // ---- hooks used by the WASI host ----
  finishRewind(): boolean {
    if (this.exports.asyncify_get_state() !== 2) return false;
    this.exports.asyncify_stop_rewind();
    return true;
  }

  pauseRequested(): boolean {
    return Atomics.load(this.ctl, ctl.pauseRequest) !== 0;
  }

  startUnwind(): void {
    this.flushOutput();
    const p = this.region().asyncifyBase;
    const dv = new DataView(this.memory.buffer);
    dv.setUint32(p, p + 8, true);
    // The end asyncify checks every frame against; the frame that crosses it lands in the
    // area's last asyncifyFrameBytesMax bytes before the check traps (boundAsyncifyStack).
    dv.setUint32(p + 4, p + this.layout.asyncifyBytes - limits.asyncifyFrameBytesMax, true);
    this.exports.asyncify_start_unwind(p);
  }

  drainInput(): void {
    this.lastWake = Atomics.load(this.ctl, ctl.wake);
    // No more than the NIC's queue takes: a COLO secondary that lags its primary (its mirrored
    // input is not windowed by its own guest) leaves the rest in the ring and its main thread,
    // as a paused one does, rather than overflowing the queue.
    let room = this.nic.pendingRoom();
    let n = 0;
    if (this.overflow.length > 0) {
      const k = Math.min(room, this.overflow.length);
      for (let i = 0; i < k; i++) this.nic.enqueue(this.overflow[i]!);
      this.overflow.splice(0, k);
      room -= k;
      n += k;
    }
    if (this.overflow.length === 0) n += this.input.read(this.enqueue, room);
    if (n > 0) this.trace?.record(vcpuTrace.input);
  }

  waitForInput(timeoutMs: number | null): boolean {
    this.flushOutput();
    if (this.channel !== null && Atomics.load(this.ctl, ctl.directOff) !== 0) this.closeChannel();
    if (this.channel !== null) {
      // Input may come on the output channel: the guest unwinds and the event loop waits (enter()).
      this.inputWait = { timeoutMs };
      return true;
    }
    // Bounded so that a wake that raced with the drain costs latency, never a hang.
    const t = timeoutMs === null ? 100 : Math.min(timeoutMs, 100);
    this.trace?.record(vcpuTrace.wait);
    Atomics.wait(this.ctl, ctl.wake, this.lastWake, t);
    this.trace?.record(vcpuTrace.woken);
    return false;
  }

  /**
   * Guest output is batched and handed on when the guest blocks, unwinds or exits (or the batch
   * is large): one message per batch instead of one per send. On a COLO secondary with an SVM
   * output channel the vCPU writes the batch to the primary itself (writeDirect).
   */
  listenerClosed(): void {
    post({ type: 'listener-closed' });
  }

  output(out: NicOutput): void {
    this.pendingOut.push(out);
    if (this.pendingOut.length >= 64) this.flushOutput();
  }

  flushOutput(): void {
    const credits = this.nic.takeCredits();
    if (this.pendingOut.length === 0 && credits === null) return;
    if (this.pendingOut.length > 0) this.trace?.record(vcpuTrace.output);
    if (this.pendingOut.length > 0 && this.writeDirect(this.pendingOut)) {
      this.pendingOut = [];
      if (credits !== null) post({ type: 'out', outs: noOutput, credits });
      return;
    }
    post({ type: 'out', outs: encodeOutputBatch(this.pendingOut), credits });
    this.pendingOut = [];
  }

  /** Write a batch to the SVM output channel, if there is one; false: post it to the main thread. */
  private writeDirect(outs: NicOutput[]): boolean {
    const ch = this.channel;
    if (ch === null) return false;
    if (Atomics.load(this.ctl, ctl.directOff) !== 0) {
      this.closeChannel();
      return false;
    }
    return this.writeChannel(ch, encodeOutputFrames(Atomics.load(this.ctl, ctl.outEpoch), outs));
  }

  private writeChannel(ch: { socket: Socket; fd: number }, b: Buffer): boolean {
    // The event loop reads the channel too (input waits), and a read that finds it broken
    // destroys the socket and closes its descriptor before 'close' is emitted: never write to a
    // descriptor that may since belong to something else.
    if (ch.socket.destroyed) {
      this.closeChannel();
      post({ type: 'direct-output-failed', message: ch.socket.errored?.message ?? 'closed by the primary' });
      return false;
    }
    let at = 0;
    let fullSince: number | null = null;
    while (at < b.byteLength) {
      try {
        at += writeSync(ch.fd, b, at, b.byteLength - at);
        fullSince = null;
      } catch (err) {
        if ((err as { code?: string }).code === 'EAGAIN') {
          // The socket is full: the guest waits for the primary to read, or for a takeover to
          // take the channel away (then the whole batch goes to the main thread). A pause
          // (a checkpoint, stop) does not wait for a primary that reads nothing for so long.
          fullSince ??= Date.now();
          const stuck = this.pauseRequested() && Date.now() - fullSince > limits.coloOutputChannelStuckMs;
          if (!stuck) Atomics.wait(this.ctl, ctl.directOff, 0, 1);
          if (!stuck && Atomics.load(this.ctl, ctl.directOff) === 0) continue;
          this.closeChannel();
          if (stuck) post({ type: 'direct-output-failed', message: `the primary read nothing for ${limits.coloOutputChannelStuckMs} ms` });
          return false;
        }
        // Broken (the primary is gone, or closed it): the main thread from now on. A batch cut
        // in the middle never reached the compare: all of it is posted.
        this.closeChannel();
        post({ type: 'direct-output-failed', message: err instanceof Error ? err.message : String(err) });
        return false;
      }
    }
    return true;
  }

  // ---- the SVM output channel (COLO secondary; colo/output-channel.ts) ----
  /** The connection the vCPU writes to, from the state restore after the primary connected. */
  private channel: { socket: Socket; fd: number } | null = null;
  /** Connected, not used before the next restore (an epoch boundary). */
  private channelReady: Socket | null = null;
  private channelListener: OutputListener | null = null;
  /** Mirrored input on the channel, split into batches. */
  private channelReader = new ChannelFrameReader();
  /** The guest unwound to wait for input in the event loop: its timeout (ms, null = none). */
  private inputWait: { timeoutMs: number | null } | null = null;
  /** Ends the event-loop wait in progress (a no-op when none is). */
  private endWait: () => void = () => undefined;
  private waitTimer: NodeJS.Timeout | null = null;
  /** An Atomics.waitAsync on ctl.wake is pending (one at a time; it ends at the next notify). */
  private wakeWaitPending = false;

  async listenForOutputChannel(host: string, migrationId: Uint8Array): Promise<number> {
    this.closeChannel();
    Atomics.store(this.ctl, ctl.directOff, 0);
    const l = await OutputListener.open(host, migrationId);
    this.channelListener = l;
    void l.accepted.then((s) => {
      if (this.channelListener === l) this.channelListener = null;
      if (s === null) return;
      if (Atomics.load(this.ctl, ctl.directOff) !== 0) {
        s.destroy();
        return;
      }
      this.channelReady = s;
      // Its end seen while the vCPU is paused (this loop runs only then): not used any more.
      let why = 'closed by the primary';
      s.on('error', (err) => (why = err.message));
      s.once('close', () => {
        if (this.channelReady === s) this.channelReady = null;
        if (this.channel?.socket !== s) return;
        this.channel = null;
        post({ type: 'direct-output-failed', message: why });
        // A guest waiting for input there waits on the ring from now on.
        this.endWait();
      });
    });
    return l.port;
  }

  /** A state restore (the secondary's apply): a channel that connected meanwhile is used from now on. */
  private takeChannel(): void {
    const s = this.channelReady;
    if (s === null || this.channel !== null) return;
    this.channelReady = null;
    const fd = (s as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
    // libuv's handle has the descriptor on every Unix; without it, output stays on the main channel.
    if (typeof fd !== 'number' || fd <= 0) {
      s.destroy();
      return;
    }
    const ch = { socket: s, fd };
    this.channel = ch;
    this.channelReader = new ChannelFrameReader();
    // Read only in an input wait (readChannel): input taken in before a restore would be lost.
    s.on('readable', () => {
      if (this.channel === ch) this.endWait();
    });
    // Tell the primary it may send the mirror here (from its next checkpoint's capture on).
    this.writeChannel(ch, encodeMirrorReady());
  }

  /**
   * Move the mirrored input the channel holds into the NIC. Returns whether the guest has
   * something new to look at (input, or a channel that broke and is gone).
   */
  private readChannel(): boolean {
    const ch = this.channel;
    if (ch === null) return false;
    let any = false;
    for (;;) {
      const chunk = ch.socket.read() as Buffer | null;
      if (chunk === null) return any;
      any = true;
      try {
        for (const p of this.channelReader.push(chunk)) {
          const b = decodeNetBatch(p);
          if (b.type !== 'input') throw new Error(`the primary sent an ${b.type} batch`);
          for (const ev of b.events) this.nic.enqueue(ev);
        }
      } catch (err) {
        // Not our primary's mirror: output goes on the main channel, input comes on the ring
        // (what is lost here the compare sees as a difference).
        this.closeChannel();
        post({ type: 'direct-output-failed', message: `bad mirrored input on the SVM output channel: ${err instanceof Error ? err.message : String(err)}` });
        return true;
      }
    }
  }

  private closeChannel(): void {
    this.channelListener?.close();
    this.channelListener = null;
    this.channelReady?.destroy();
    this.channelReady = null;
    this.channel?.socket.destroy();
    this.channel = null;
  }

  markWrite(ptr: number, len: number): void {
    if (!this.layout.storeLog || len === 0) return;
    // A cached view, new when the memory has grown (the map moved up, maybe past an old view).
    const buf = this.memory.buffer;
    if (buf.byteLength !== this.logBufferLength) {
      this.logU8 = new Uint8Array(buf);
      this.logBufferLength = buf.byteLength;
    }
    const u8 = this.logU8!;
    const first = ptr >>> 12;
    const last = (ptr + len - 1) >>> 12;
    const base = this.dirtyLogBase;
    for (let p = first; p <= last; p++) u8[base + p] = 1;
  }

  preemptSoon(): void {
    if (this.budget !== null && this.pauseRequested()) this.budget.value = 0;
  }

  waitForConsole(): boolean {
    // The guest's network output so far goes out meanwhile.
    this.flushOutput();
    const seen = Atomics.load(this.ctl, ctl.wake);
    if (this.pauseRequested()) return false;
    Atomics.wait(this.ctl, ctl.wake, seen, limits.serialFullRetryMs);
    return !this.pauseRequested();
  }

  waitForDiskSpace(reason: string): boolean {
    this.diskFull = true;
    if (!this.ioReported) {
      // The guest stops, as a VM in io-error does: its clock too, and its output so far goes out.
      this.ioReported = true;
      this.clock.pause();
      this.flushOutput();
      Atomics.store(this.ctl, ctl.retryIo, 0);
      post({ type: 'io-error', operation: 'write', action: 'stop', nospace: true, reason });
    }
    const deadline = Date.now() + limits.diskFullRetryMs;
    for (;;) {
      // Read the wake counter before the flags: a request that lands in between changes it,
      // and the wait below returns at once.
      const seen = Atomics.load(this.ctl, ctl.wake);
      if (this.pauseRequested()) {
        // The pause ends this wait (run() restarts the clock); a resumed guest that still finds
        // no space reports io-error again.
        this.ioReported = false;
        return false;
      }
      if (Atomics.exchange(this.ctl, ctl.retryIo, 0) !== 0) return true;
      const left = deadline - Date.now();
      if (left <= 0) return true;
      Atomics.wait(this.ctl, ctl.wake, seen, left);
    }
  }

  reportIoError(operation: 'read' | 'write', nospace: boolean, reason: string): void {
    post({ type: 'io-error', operation, action: 'report', nospace, reason });
  }

  chargeBytes(bytes: number): void {
    const budget = this.budget;
    if (budget === null || bytes < limits.preemptBulkBytesPerCount) return;
    // Floored at -2^31 (an i32): a charge larger than the budget only preempts sooner.
    budget.value = Math.max((budget.value as number) - Math.floor(bytes / limits.preemptBulkBytesPerCount), -0x80000000);
  }

  diskWriteDone(): void {
    if (!this.diskFull) return;
    this.diskFull = false;
    if (this.ioReported) {
      this.ioReported = false;
      this.clock.resume();
    }
    post({ type: 'io-resumed' });
  }

  private preempt(): void {
    this.finishRewind();
    this.flushOutput();
    if (this.pauseRequested()) this.startUnwind();
  }

  // ---- run / pause ----
  run(): void {
    if (this.phase === 'exited' || this.phase === 'panicked') {
      post({ type: 'error', message: `the guest has ${this.phase === 'exited' ? 'exited' : 'crashed'}; it cannot run` });
      return;
    }
    if (Atomics.load(this.ctl, ctl.directOff) !== 0) this.closeChannel();
    this.cancelWait();
    if (this.phase === 'unwound') this.rewind();
    else this.phase = 'running';
    this.clock.resume();
    post({ type: 'running' });
    this.enter();
  }

  /** Run the guest (started, or rewinding) until it exits, crashes, pauses or waits in the event loop. */
  private enter(): void {
    for (;;) {
      try {
        this.exports._start();
      } catch (err) {
        this.inputWait = null;
        this.clock.pause();
        this.flushOutput();
        if (err instanceof ProcExit) {
          this.phase = 'exited';
          post({ type: 'exited', code: err.code });
        } else {
          this.phase = 'panicked';
          post({ type: 'panicked', message: this.unwindFailure() ?? (err instanceof Error ? err.message : String(err)) });
        }
        return;
      }
      const state = this.exports.asyncify_get_state();
      if (state === 1 && this.inputWait !== null && !this.pauseRequested()) {
        this.exports.asyncify_stop_unwind();
        this.phase = 'unwound';
        if (!this.inputNow()) {
          this.waitInLoop(this.inputWait.timeoutMs);
          return;
        }
        this.inputWait = null;
        this.rewind();
        continue;
      }
      this.inputWait = null;
      this.clock.pause();
      this.flushOutput();
      this.afterUnwind(state);
      return;
    }
  }

  /** Whether the guest, unwound to wait for input, has something to look at without waiting. */
  private inputNow(): boolean {
    if (this.channel === null) return true; // gone: the guest waits on the ring
    if (Atomics.load(this.ctl, ctl.directOff) !== 0) {
      // A takeover: this node's own front end feeds the ring from now on.
      this.closeChannel();
      return true;
    }
    if (Atomics.load(this.ctl, ctl.wake) !== this.lastWake) return true;
    return this.readChannel();
  }

  /**
   * Wait in the event loop for the channel's input, a wake (ring input, a pause, a takeover) or
   * the guest's timeout, whichever comes first; then resume the guest, or report the pause.
   */
  private waitInLoop(timeoutMs: number | null): void {
    let done = false;
    this.trace?.record(vcpuTrace.wait);
    const end = (): void => {
      if (done) return;
      done = true;
      this.trace?.record(vcpuTrace.woken);
      this.cancelWait();
      if (this.phase !== 'unwound' || this.inputWait === null) return;
      this.inputWait = null;
      if (this.pauseRequested()) {
        this.clock.pause();
        this.postPaused();
        return;
      }
      this.inputNow();
      this.rewind();
      this.enter();
    };
    this.endWait = end;
    // A longer timer would fire after 1 ms (with a warning each time): a guest's poll with a
    // huge timeout (Rust's sleep(Duration::MAX)) spun here. At timerMsMax the guest is rewound
    // and its poll, which keeps its deadline, waits again.
    if (timeoutMs !== null) this.waitTimer = setTimeout(end, Math.min(timeoutMs, limits.timerMsMax));
    if (!this.wakeWaitPending) {
      const w = waitAsync(this.ctl, ctl.wake, this.lastWake);
      if (!w.async) {
        setImmediate(end);
        return;
      }
      this.wakeWaitPending = true;
      void w.value.then(() => {
        this.wakeWaitPending = false;
        this.endWait();
      });
    }
  }

  /** An unwound guest goes back to where it was on its next _start. */
  private rewind(): void {
    this.exports.asyncify_start_rewind(this.region().asyncifyBase);
    this.phase = 'running';
  }

  private cancelWait(): void {
    this.endWait = () => undefined;
    if (this.waitTimer !== null) clearTimeout(this.waitTimer);
    this.waitTimer = null;
  }

  /**
   * Why the guest trapped, when it trapped while unwinding: its call stack did not fit the
   * asyncify area (the bounds check, or asyncify_stop_unwind's own, trapped). Null otherwise.
   * Nothing past the area was written; the guest cannot be resumed (its frames are gone).
   */
  private unwindFailure(): string | null {
    if (this.exports.asyncify_get_state() !== 1) return null;
    return `the guest's call stack is too deep to pause: saving it needs more than the ${this.layout.asyncifyBytes - limits.asyncifyFrameBytesMax} bytes colo-vm reserves for it (limits.asyncifyStackBytes); the guest is stopped`;
  }

  private afterUnwind(state: number): void {
    if (state === 1) {
      try {
        this.exports.asyncify_stop_unwind();
      } catch (err) {
        this.phase = 'panicked';
        post({ type: 'panicked', message: this.unwindFailure() ?? (err instanceof Error ? err.message : String(err)) });
        return;
      }
      this.phase = 'unwound';
      this.postPaused();
    } else if (state === 2) {
      // Still rewinding: the saved call stack named calls the code does not make, so the
      // state in RAM does not belong to it. Never report that as a guest that returned 0.
      this.exports.asyncify_stop_rewind();
      this.phase = 'panicked';
      post({ type: 'panicked', message: 'the guest did not rewind to where it was paused: its saved call stack does not match its code and memory (inconsistent state)' });
    } else {
      this.phase = 'exited';
      post({ type: 'exited', code: 0 });
    }
  }

  /** 'paused', with the state when the pause asked for it (Machine.pauseAndSave). */
  private postPaused(): void {
    post(Atomics.load(this.ctl, ctl.pauseRequest) === 2 ? { type: 'paused', state: this.save() } : { type: 'paused' });
  }

  save(): VcpuState {
    // Input that reached the port belongs to the state (pending, not admitted), also what the
    // NIC's queue had no room for.
    this.drainInput();
    this.input.read((ev) => this.overflow.push(ev));
    const nic = this.nic.save(this.overflow);
    const globals: Record<string, number | bigint> = {};
    for (const g of this.layout.globals) {
      const x = this.instance.exports[g.exportName];
      if (!(x instanceof WebAssembly.Global)) throw new Error(`global export ${g.exportName} missing`);
      globals[g.exportName] = g.type === 'f32' || g.type === 'f64' ? floatGlobalBits(g.type, x.value as number) : (x.value as number | bigint);
    }
    return {
      started: this.phase !== 'fresh',
      exited: this.phase === 'exited',
      globals,
      memoryPages: this.memory.buffer.byteLength / 65536,
      clock: this.clock.save(),
      serial: this.serial.save(),
      nic,
      wasi: this.host.save(),
    };
  }

  restore(raw: VcpuState): void {
    const s = v.record(raw, 'vcpu');
    const started = v.bool(s.started, 'vcpu.started');
    if (v.bool(s.exited, 'vcpu.exited')) throw new RestoreError('STATE_EXITED', 'the saved guest had exited; there is nothing to resume');
    const globals = v.record(s.globals, 'vcpu.globals');
    const values: Record<string, number | bigint> = {};
    for (const g of this.layout.globals) {
      const val = globals[g.exportName];
      // A float is its bits (floatGlobalBits); a number too, as a state of an older colo-vm has it.
      const value = (g.type === 'f32' || g.type === 'f64') && typeof val === 'bigint' ? floatGlobalValue(g.type, val) : val;
      if (g.type === 'i64' ? typeof value !== 'bigint' : typeof value !== 'number') {
        throw new RestoreError('STATE_INVALID', `vcpu.globals.${g.exportName}: expected a ${g.type}`);
      }
      values[g.exportName] = value as number | bigint;
    }
    const extra = Object.keys(globals).filter((k) => !this.layout.globals.some((g) => g.exportName === k));
    if (extra.length > 0) throw new RestoreError('STATE_INVALID', `vcpu.globals: unknown global ${extra[0]}`);
    const pages = globals['colo$pages'];
    const memoryPages = this.memory.buffer.byteLength / limits.wasmPageBytes;
    if (typeof pages !== 'number' || !Number.isInteger(pages) || pages < 0 || pages + this.layout.reservedPages > memoryPages) {
      throw new RestoreError('STATE_MEMORY', `vcpu.globals.colo$pages: the guest's size (${String(pages)} pages) and colo's region do not fit this machine's ${memoryPages} pages of memory`);
    }
    // Validate every device before changing any.
    const probeNic = new Nic();
    probeNic.restore(s.nic);
    new Clock().restore(s.clock);
    new Serial(null).restore(s.serial);
    this.host.restore(s.wasi); // validates everything before it changes anything
    this.nic.restore(s.nic);
    this.clock.restore(s.clock);
    this.serial.restore(s.serial);
    this.takeChannel();
    const from = this.guestPages();
    for (const g of this.layout.globals) {
      (this.instance.exports[g.exportName] as WebAssembly.Global).value = values[g.exportName];
    }
    this.regionLock.with(() => {
      regionAfterRestore(this.memory, this.layout, from, pages);
      this.setGuestPages(pages); // the size says where the map is, whatever the state's colo$dirtylog said
    });
    this.phase = started ? 'unwound' : 'fresh';
  }

  /** Connections the guest knows (for a front end that must reset the ones it does not have). */
  connections(): number[] {
    return this.nic.connectionIds();
  }

  maxConnId(): number {
    return this.nic.maxConnId();
  }
}

/** Atomics.waitAsync (in Node since 16; this TypeScript lib does not declare it). */
const waitAsync = (Atomics as unknown as {
  waitAsync(a: Int32Array, index: number, value: number): { async: false; value: string } | { async: true; value: Promise<string> };
}).waitAsync.bind(Atomics);

function post(m: WorkerReply): void {
  parentPort!.postMessage(m);
}

let vcpu: Vcpu | null = null;

parentPort!.on('message', (m: WorkerRequest) => {
  try {
    switch (m.type) {
      case 'init':
        vcpu = new Vcpu(m.memory, m);
        post({ type: 'ready' });
        return;
      case 'run':
        vcpu!.run();
        return;
      case 'output-channel':
        vcpu!.listenForOutputChannel(m.host, m.migrationId).then(
          (port) => post({ type: 'output-channel', port }),
          (err: unknown) => post({ type: 'error', message: `cannot listen for the SVM output channel: ${err instanceof Error ? err.message : String(err)}` }),
        );
        return;
      case 'save':
        post({ type: 'state', state: vcpu!.save() });
        return;
      case 'restore':
        vcpu!.restore(m.state);
        post({ type: 'restored', connections: vcpu!.connections(), maxConnId: vcpu!.maxConnId() });
        if (m.run === true) vcpu!.run();
        return;
    }
  } catch (err) {
    post({ type: 'error', message: err instanceof Error ? err.message : String(err), code: (err as { code?: string }).code });
  }
});
