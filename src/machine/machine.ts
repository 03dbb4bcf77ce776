import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import v8 from 'node:v8';
import { Worker } from 'node:worker_threads';
import { limits } from '../core/limits.js';
import { ColoError, GuestLoadError, RestoreError, TimeoutError, UsageError } from '../core/errors.js';
import { Disk } from '../block/disk.js';
import type { NicInput, NicOutput } from '../net/nic.js';
import type { InstrumentedGuest } from './instrument.js';
import { LogDirtyTracker, ShadowDirtyTracker, type DirtyTracker, type LogPlace } from './dirty.js';
import { RegionLock, regionAfterRestore, regionAt, type ReservedRegion } from './reserved-region.js';
import { InputRingWriter, createInputRing } from './input-ring.js';
import { logger } from '../core/log.js';
import { SharedTraceLog, latencyTrace, vcpuTraceEvents } from '../core/latency-trace.js';
import { ctl, decodeOutputBatch, type GuestLayout, type VcpuState, type WorkerReply, type WorkerRequest } from './vcpu-protocol.js';

/** QEMU's run states, as `query-status` reports them. */
export type RunState =
  | 'prelaunch'
  | 'running'
  | 'paused'
  | 'inmigrate'
  | 'postmigrate'
  | 'finish-migrate'
  | 'colo'
  | 'io-error'
  | 'shutdown'
  | 'guest-panicked'
  | 'internal-error'
  | 'restore-vm';

export type SerialTarget = { kind: 'file'; path: string } | { kind: 'stdio' } | { kind: 'none' };

export interface MachineConfig {
  guest: InstrumentedGuest;
  /** Guest RAM maximum in bytes (--memory). */
  memoryBytesMax: number;
  args: string[];
  env: string[];
  serial: SerialTarget;
  /** lock 'deferred': an incoming migration's destination, locked when it activates (Disk.activate). */
  drive: { path: string; snapshot: boolean; lock?: 'now' | 'deferred' } | null;
}

export class MachineError extends ColoError {}

/**
 * A guest disk access the host could not do. action stop: a write waits for space (state
 * io-error); report: the guest was given EIO and runs on (QEMU's rerror=report, and
 * werror=enospc's for any error but ENOSPC).
 */
export interface IoErrorReport {
  operation: 'read' | 'write';
  action: 'stop' | 'report';
  nospace: boolean;
  reason: string;
}

const log = logger('machine');

/** What one input event waiting in the main thread counts (Machine.pendingInputBytes). */
function inputCharge(ev: NicInput): number {
  return limits.nicInputEventCharge + (ev.kind === 'data' ? ev.bytes.byteLength : 0);
}

/**
 * Events: 'stop', 'resume', 'output' (NicOutput), 'shutdown' (exit code), 'panicked' (message;
 * then 'stop', as QEMU's GUEST_PANICKED is followed by STOP),
 * 'io-error' (IoErrorReport: a disk write waits for space on the host, or a disk access failed), 'io-resumed',
 * 'direct-output-failed' (message: the COLO output channel broke or was closed by the primary;
 * output events again), 'listener-closed' (the guest closed its listening socket, fd 3).
 */
export class Machine extends EventEmitter {
  readonly guest: InstrumentedGuest;
  readonly memory: WebAssembly.Memory;
  readonly layout: GuestLayout;
  readonly disk: Disk | null;
  readonly maximumPages: number;
  private readonly worker: Worker;
  private readonly ctl: Int32Array;
  /** Held while the dirty map is read or colo's region moved (reserved-region.ts); the vCPU's grow takes it too. */
  private readonly regionLock: RegionLock;
  private readonly input: InputRingWriter;
  private inputRetry: NodeJS.Timeout | null = null;
  private readonly serialFd: number | null;
  /** --serial's target, for its log lines. */
  private readonly serialName: string;
  private state: RunState = 'prelaunch';
  /** The vCPU's answer to the pause it was asked for, while it has not come. */
  private pauseInFlight: Promise<WorkerReply> | null = null;
  private waiters: { accept: (m: WorkerReply) => boolean; resolve: (m: WorkerReply) => void; reject: (e: Error) => void }[] = [];
  private destroyed = false;
  private vcpuRunning = false;
  private pendingInput: NicInput[] = [];
  /** What pendingInput holds: data bytes plus limits.nicInputEventCharge per event (pendingInputBytes). */
  private pendingInputCharge = 0;
  /**
   * A save is on its way from the vCPU: input is not written to the ring meanwhile, so that
   * every event numbered is either in the state the vCPU saves (it drains the ring first) or
   * still in pendingInput when the state arrives (withPendingInput adds it).
   */
  private savesInFlight = 0;
  /** The run state to go back to when a write that waited for disk space goes through. */
  private stateBeforeIoError: RunState = 'running';
  exitCode: number | null = null;

  private constructor(cfg: MachineConfig, layout: GuestLayout, memory: WebAssembly.Memory, maximumPages: number, disk: Disk | null, serialFd: number | null) {
    super();
    this.guest = cfg.guest;
    this.layout = layout;
    this.memory = memory;
    this.maximumPages = maximumPages;
    this.disk = disk;
    this.serialFd = serialFd;
    this.serialName = cfg.serial.kind === 'file' ? `file:${cfg.serial.path}` : cfg.serial.kind;
    const ctlBuffer = new SharedArrayBuffer(ctl.slots * 4);
    this.ctl = new Int32Array(ctlBuffer);
    this.regionLock = new RegionLock(this.ctl, ctl.regionLock);
    const ring = createInputRing(limits.nicInputRingBytes);
    let trace: SharedTraceLog | null = null;
    if (latencyTrace !== null) {
      trace = SharedTraceLog.create(limits.latencyTraceEventsMax);
      latencyTrace.attach(trace, vcpuTraceEvents);
    }
    this.input = new InputRingWriter(ring);
    this.worker = new Worker(new URL('./vcpu-worker.js', import.meta.url));
    this.worker.on('message', (m: WorkerReply) => this.onWorkerMessage(m));
    this.worker.on('error', (err) => this.onWorkerFailure(err));
    this.worker.on('exit', (code) => {
      if (!this.destroyed) this.onWorkerFailure(new MachineError('VCPU_EXIT', `the vCPU thread exited unexpectedly (code ${code})`));
    });
    const init: WorkerRequest = {
      type: 'init',
      module: compileGuest(cfg.guest.wasm),
      memory,
      ctl: ctlBuffer,
      inputRing: ring,
      layout,
      args: cfg.args,
      env: cfg.env,
      serialFd,
      disk: disk?.spec ?? null,
      trace: trace?.buffer ?? null,
    };
    this.worker.postMessage(init);
  }

  /** Load the guest into a new machine, paused before its first instruction (`prelaunch`). */
  static async create(cfg: MachineConfig): Promise<Machine> {
    checkGuestArgs(cfg.args, cfg.env);
    const maximumPages = Math.floor(cfg.memoryBytesMax / limits.wasmPageBytes);
    if (maximumPages < 1 || cfg.memoryBytesMax > limits.guestMemoryBytesMax) {
      throw new UsageError('MEMORY_SIZE', `--memory must be between 64K and ${limits.guestMemoryBytesMax} bytes`);
    }
    const layout = computeLayout(cfg.guest, maximumPages);
    const guestMax = cfg.guest.memory.maximumPages;
    const maxPages = guestMax === null ? maximumPages : Math.min(maximumPages, guestMax + layout.reservedPages);
    const initial = layout.initialPages + layout.reservedPages;
    if (initial > maxPages) {
      throw new UsageError(
        'MEMORY_SIZE',
        `the guest needs ${(initial * limits.wasmPageBytes) / 1048576} MiB of memory at start, above the --memory maximum of ${(maxPages * limits.wasmPageBytes) / 1048576} MiB`,
      );
    }
    let memory: WebAssembly.Memory;
    try {
      memory = new WebAssembly.Memory({ initial, maximum: maxPages, shared: true });
    } catch (err) {
      // V8 reserves the maximum at once: a host that limits address space (ulimit -v, a
      // container's overcommit policy) refuses it, as QEMU's "cannot set up guest memory".
      throw new MachineError(
        'MEMORY_ALLOC',
        `cannot set up guest memory: reserving ${(maxPages * limits.wasmPageBytes) / 1048576} MiB (--memory) failed: ${(err as Error).message}`,
      );
    }
    const disk = cfg.drive === null ? null : Disk.open(cfg.drive.path, { snapshot: cfg.drive.snapshot, lock: cfg.drive.lock });
    let serialFd: number | null = null;
    if (cfg.serial.kind === 'file') {
      try {
        serialFd = openSerialFile(cfg.serial.path);
      } catch (err) {
        disk?.close();
        throw new UsageError('SERIAL_OPEN', `cannot open serial file '${cfg.serial.path}': ${(err as Error).message}`);
      }
    } else if (cfg.serial.kind === 'stdio') {
      serialFd = nonBlockingStdout();
    }
    const m = new Machine(cfg, layout, memory, maxPages, disk, serialFd);
    let r: WorkerReply;
    try {
      r = await m.expect((x) => x.type === 'ready' || x.type === 'error', 'the vCPU to load the guest', 30000);
    } catch (err) {
      await m.destroy();
      throw err;
    }
    if (r.type === 'error') {
      // Instantiating failed (a segment out of bounds, a trap while initialising): the guest
      // cannot run at all, and the vCPU said why.
      await m.destroy();
      throw new GuestLoadError('GUEST_INSTANTIATE', `the guest module cannot be instantiated: ${r.message}`);
    }
    return m;
  }

  get runState(): RunState {
    return this.state;
  }

  /** Set a run state that is not tied to the vCPU (inmigrate, postmigrate, colo...). */
  setRunState(s: RunState): void {
    this.state = s;
  }

  get running(): boolean {
    return this.vcpuRunning;
  }

  /** Current guest RAM (a view of the shared memory, valid until the next grow). */
  ram(): Uint8Array {
    return new Uint8Array(this.memory.buffer);
  }

  ramPages(): number {
    return this.memory.buffer.byteLength / limits.wasmPageBytes;
  }

  /** The guest's own size in wasm pages (its memory.size; the memory also holds colo's region above it). */
  guestPages(): number {
    return Atomics.load(this.ctl, ctl.guestPages);
  }

  /**
   * The memory a state of this machine needs, in wasm pages: the guest's own pages and colo's
   * region right above them. The memory may be larger (reserved-region.ts: a COLO secondary
   * that ran ahead of its primary); what lies above is zero and not part of the state, so a
   * migration announces this size, not the memory's, and a target with a smaller --memory
   * that holds the guest takes it.
   */
  statePages(): number {
    return this.guestPages() + this.layout.reservedPages;
  }

  /**
   * A state whose guest has `pages` pages is being loaded into this memory (a COLO checkpoint,
   * before dirty tracking starts afresh): colo's region moves above it now, as the vCPU's
   * restore would, so that the dirty map is read where it will be (reserved-region.ts).
   */
  placeRegionFor(pages: number): void {
    if (!Number.isInteger(pages) || pages < 0 || (pages + this.layout.reservedPages) * limits.wasmPageBytes > this.memory.buffer.byteLength) {
      throw new RestoreError('STATE_MEMORY', `the state's guest size (${pages} pages) and colo's region do not fit this machine's ${this.ramPages()} pages of memory`);
    }
    this.regionLock.with(() => {
      regionAfterRestore(this.memory, this.layout, this.guestPages(), pages);
      Atomics.store(this.ctl, ctl.guestPages, pages);
    });
  }

  /** Where colo's region lies in guest memory now (it moves up when the guest grows). */
  region(): ReservedRegion {
    return regionAt(this.layout, this.guestPages());
  }

  /**
   * The 4 KiB pages that make up the machine state: the guest's memory and colo's asyncify
   * area, not the dirty byte map (it describes the state, it is not part of it) and not the
   * zero pages above the region (reserved-region.ts). For the guest's size now (a guest that
   * grows changes them), or for a guest of `guestPages` (a state about to be loaded).
   */
  statePageRanges(guestPages = this.guestPages()): [number, number][] {
    const r = regionAt(this.layout, guestPages);
    const end = r.end / limits.pageBytes;
    if (!this.layout.storeLog) return [[0, end]];
    const logStart = Math.floor(r.dirtyLogBase / limits.pageBytes);
    const logEnd = Math.ceil(r.dirtyLogEnd / limits.pageBytes);
    return [[0, logStart], [logEnd, end]].filter(([a, b]) => b! > a!) as [number, number][];
  }

  /**
   * The dirty-page tracker that fits this guest: the store log when it has one. `sinceBoot`:
   * the machine booted fresh and nothing but the guest wrote its RAM yet, so the log also tells
   * which pages were never written (a migration sends those as zero pages without reading them).
   */
  dirtyTracker(opts: { sinceBoot?: boolean } = {}): DirtyTracker {
    if (this.layout.storeLog) {
      const pagesMax = (this.maximumPages * limits.wasmPageBytes) / limits.pageBytes;
      const lock = this.regionLock;
      const memory = this.memory;
      const at = (): LogPlace => {
        const ram = new Uint8Array(memory.buffer);
        const r = this.region();
        return { ram, logBase: r.dirtyLogBase, always: [Math.floor(r.asyncifyBase / limits.pageBytes), Math.ceil(r.asyncifyEnd / limits.pageBytes)] };
      };
      return new LogDirtyTracker(at, (fn) => lock.with(fn), { sinceBoot: opts.sinceBoot ?? false, pagesMax });
    }
    return new ShadowDirtyTracker(this.maximumPages * limits.wasmPageBytes);
  }

  /**
   * Grow RAM to at least `pages` wasm pages (an incoming state may be larger than a fresh
   * guest). A memory already larger stays so (a COLO secondary that ran ahead of its primary):
   * the guest's size comes with the state, and pages above colo's region are zero.
   */
  growRamTo(pages: number): void {
    const now = this.ramPages();
    if (pages > this.maximumPages) {
      throw new RestoreError('STATE_MEMORY', `the state has ${pages * 64} KiB of memory, above this machine's maximum of ${this.maximumPages * 64} KiB (--memory)`);
    }
    if (pages > now) this.memory.grow(pages - now);
  }

  /** Start the guest, or continue it from where it was paused or restored. */
  async cont(): Promise<void> {
    this.assertAlive();
    if (this.vcpuRunning) {
      // In io-error the vCPU waits inside the guest's write: try it again now, as QEMU's cont does.
      if (this.state === 'io-error') this.signal(ctl.retryIo);
      return;
    }
    if (this.state === 'shutdown' || this.state === 'guest-panicked') {
      throw new MachineError('VM_DEAD', `the guest is in state ${this.state} and cannot run`);
    }
    Atomics.store(this.ctl, ctl.pauseRequest, 0);
    this.worker.postMessage({ type: 'run' } satisfies WorkerRequest);
    const r = await this.expect((x) => x.type === 'running' || x.type === 'error' || x.type === 'exited' || x.type === 'panicked', 'the vCPU to start', 10000);
    if (r.type === 'error') throw new MachineError('VM_DEAD', r.message);
  }

  /** Pause at the next safe point; resolves once the vCPU is stopped. */
  async pause(next: RunState = 'paused'): Promise<void> {
    await this.pauseWith(next, false);
  }

  /**
   * pause() and saveVcpu() in one exchange with the vCPU (a COLO checkpoint's pause is that
   * much shorter). The state is null when the vCPU stopped otherwise (it exited or crashed).
   */
  async pauseAndSave(next: RunState): Promise<VcpuState | null> {
    return this.pauseWith(next, true);
  }

  private async pauseWith(next: RunState, save: boolean): Promise<VcpuState | null> {
    this.assertAlive();
    const inFlight = this.pauseInFlight;
    if (inFlight !== null) {
      // A pause already waits for the vCPU (a QMP stop during a checkpoint's pause). The vCPU
      // answers it once: this one shares that answer, then finds the vCPU stopped (and saves).
      await inFlight.catch(() => undefined);
      return this.pauseWith(next, save);
    }
    if (!this.vcpuRunning) {
      // A guest that exited or crashed stays so (as QEMU's stop on a stopped VM changes nothing).
      if (this.state === 'shutdown' || this.state === 'guest-panicked' || this.state === 'internal-error') return null;
      if (next !== 'paused' || this.state !== 'prelaunch') this.state = next;
      return save ? this.saveVcpu() : null;
    }
    // 'error': the vCPU failed while stopping the guest (a bug); without it here the pause
    // timed out and the machine went on saying it was running.
    const done = this.expect((r) => r.type === 'paused' || r.type === 'exited' || r.type === 'panicked' || r.type === 'error', 'the vCPU to reach a safe point', limits.pauseTimeoutMs);
    // Input already numbered goes to the vCPU first: the state saved at the pause holds it.
    if (save) this.holdInputForSave();
    this.signal(ctl.pauseRequest, save ? 2 : 1);
    this.pauseInFlight = done;
    let state: VcpuState | null = null;
    let r: WorkerReply;
    try {
      r = await done;
      const saved = r.type === 'paused' ? r.state : undefined;
      if (saved !== undefined) state = this.withPendingInput(saved);
    } catch (err) {
      // No safe point in time (a host call that takes long: an fsync of a slow disk, a huge
      // random_get): the pause failed, so the guest runs on, as the error says. Left standing,
      // the request stopped it once the call returned, with nobody waiting: a QMP stop that
      // failed, or a migration that failed and resumed the VM, left it stopped for good while
      // query-status said running. A vCPU that saw the request already pauses anyway ('paused').
      if (err instanceof TimeoutError) Atomics.store(this.ctl, ctl.pauseRequest, 0);
      throw err;
    } finally {
      this.pauseInFlight = null;
      if (save) this.releaseInputAfterSave();
    }
    if (r.type === 'error') {
      this.vcpuRunning = false;
      this.state = 'internal-error';
      this.emit('panicked', r.message);
      this.emit('stop');
      throw new MachineError('VCPU_FAILED', `the vCPU failed while pausing the guest: ${r.message}`);
    }
    if (r.type !== 'paused') return null;
    this.state = next;
    return state;
  }

  /** Write what fits of the input to the ring, then hold the rest until the save's answer (releaseInputAfterSave, after withPendingInput). */
  private holdInputForSave(): void {
    this.flushInput();
    this.savesInFlight++;
  }

  private releaseInputAfterSave(): void {
    this.savesInFlight--;
    this.flushInput();
  }

  /**
   * The state with the input the ring had no room for: events read from clients (and, under
   * COLO, mirrored) but not yet written to the vCPU. They belong to the state as pending input,
   * as much as those in the ring do: a state without them loses them (a migration moved a
   * stopped VM that kept reading its clients without the last megabytes of their requests).
   * The live vCPU still gets them from pendingInput, after what the state has.
   */
  private withPendingInput(state: VcpuState): VcpuState {
    const more = this.pendingInput;
    if (more.length === 0) return state;
    const nic = state.nic;
    const pending = nic.pending.slice();
    let lastSeq = nic.lastSeq;
    for (const ev of more) {
      if (ev.seq <= lastSeq) continue;
      pending.push(ev.kind === 'data' ? { seq: ev.seq, kind: ev.kind, conn: ev.conn, bytes: ev.bytes } : { seq: ev.seq, kind: ev.kind, conn: ev.conn });
      lastSeq = ev.seq;
    }
    return { ...state, nic: { ...nic, lastSeq, pending } };
  }

  /**
   * COLO secondary: the vCPU listens for the SVM output channel (colo/output-channel.ts) on
   * `host`; returns the port. Once the primary connected, the vCPU writes guest output there
   * itself, tagged with the output epoch, from the next restoreVcpu on, instead of emitting
   * 'output'. Only while the vCPU is paused.
   */
  async openOutputChannel(host: string, migrationId: Uint8Array): Promise<number> {
    this.assertAlive();
    if (this.vcpuRunning) throw new MachineError('VM_RUNNING', 'the output channel can be opened only while the vCPU is paused');
    this.worker.postMessage({ type: 'output-channel', host, migrationId } satisfies WorkerRequest);
    const r = await this.expect((x) => x.type === 'output-channel' || x.type === 'error', 'the vCPU to listen for the output channel', 10000);
    if (r.type === 'error') throw new MachineError('OUTPUT_CHANNEL', r.message);
    return (r as Extract<WorkerReply, { type: 'output-channel' }>).port;
  }

  /** The epoch output on the output channel is tagged with (set while paused, before the vCPU runs). */
  setOutputEpoch(epoch: number): void {
    Atomics.store(this.ctl, ctl.outEpoch, epoch);
  }

  /**
   * No more output on the output channel: 'output' events from the vCPU's next batch on (one
   * already being written still goes there). The vCPU closes the channel.
   */
  stopDirectOutput(): void {
    Atomics.store(this.ctl, ctl.directOff, 1);
    Atomics.notify(this.ctl, ctl.directOff);
    // A vCPU waiting for input on the channel (in its event loop) stops reading it now.
    Atomics.add(this.ctl, ctl.wake, 1);
    Atomics.notify(this.ctl, ctl.wake);
  }

  /** Raise a flag of the control block and wake the vCPU to look at it. */
  private signal(slot: number, value = 1): void {
    Atomics.store(this.ctl, slot, value);
    Atomics.add(this.ctl, ctl.wake, 1);
    Atomics.notify(this.ctl, ctl.wake);
  }

  /** Device and vCPU state (the machine must be paused). */
  async saveVcpu(): Promise<VcpuState> {
    this.assertAlive();
    if (this.vcpuRunning) throw new MachineError('VM_RUNNING', 'the machine must be paused to save its state');
    this.holdInputForSave();
    let r: WorkerReply;
    let state: VcpuState | null = null;
    try {
      this.worker.postMessage({ type: 'save' } satisfies WorkerRequest);
      r = await this.expect((x) => x.type === 'state' || x.type === 'error', 'the vCPU state', 10000);
      if (r.type === 'state') state = this.withPendingInput(r.state);
    } finally {
      this.releaseInputAfterSave();
    }
    if (r.type === 'error' || state === null) throw new MachineError('SAVE_FAILED', r.type === 'error' ? r.message : `unexpected ${r.type}`);
    return state;
  }

  /**
   * Load device and vCPU state into a paused machine; RAM must already hold the saved pages.
   * `run`: and start the guest from it, in the same exchange with the vCPU (a COLO secondary's
   * apply: the SVM runs that much sooner); it resolves once the guest runs.
   */
  async restoreVcpu(state: VcpuState, opts: { run?: boolean } = {}): Promise<{ connections: number[]; maxConnId: number }> {
    this.assertAlive();
    if (this.vcpuRunning) throw new MachineError('VM_RUNNING', 'the machine must be paused to load a state');
    const run = opts.run === true;
    if (run) Atomics.store(this.ctl, ctl.pauseRequest, 0);
    // With run the vCPU answers 'restored' and then 'running' (or why it could not run).
    let restored: Extract<WorkerReply, { type: 'restored' }> | null = null;
    const done = this.expect(
      (x) => {
        if (x.type === 'restored') {
          restored = x;
          return !run;
        }
        return x.type === 'error' || (run && restored !== null && (x.type === 'running' || x.type === 'exited' || x.type === 'panicked'));
      },
      run ? 'the vCPU to load the state and run' : 'the vCPU to load the state',
      10000,
    );
    this.worker.postMessage({ type: 'restore', state, run } satisfies WorkerRequest);
    const r = await done;
    const ok = restored as Extract<WorkerReply, { type: 'restored' }> | null;
    if (ok === null) throw new RestoreError(r.type === 'error' ? (r.code ?? 'STATE_INVALID') : 'STATE_INVALID', r.type === 'error' ? r.message : `unexpected ${r.type}`);
    if (r.type === 'error') throw new MachineError('VM_DEAD', r.message);
    this.dropInputBefore(state.nic.lastSeq);
    return { connections: ok.connections, maxConnId: ok.maxConnId };
  }

  /**
   * Deliver a network input event to the guest NIC. Events of one turn of the event loop go
   * to the vCPU as one message (flushed at setImmediate, or at once before a save).
   */
  injectInput(ev: NicInput): void {
    if (this.destroyed) return;
    this.pendingInput.push(ev);
    this.pendingInputCharge += inputCharge(ev);
    if (this.pendingInput.length === 1) setImmediate(() => this.flushInput());
  }

  /**
   * Input injected that the vCPU has not taken into its ring yet (a guest that reads nothing,
   * or a paused one, leaves it here), as data bytes plus limits.nicInputEventCharge per event.
   * Nothing here bounds it: whoever injects does (a front end's windows, a COLO secondary's
   * SecondaryNet).
   */
  get pendingInputBytes(): number {
    return this.pendingInputCharge;
  }

  /**
   * Input still waiting here that a state just loaded already has (numbered up to its
   * lastSeq): the NIC would drop it anyway, once the ring had carried it there. A COLO
   * secondary whose SVM fell behind its mirror sheds that backlog at the checkpoint's apply.
   */
  private dropInputBefore(lastSeq: number): void {
    let k = 0;
    while (k < this.pendingInput.length && this.pendingInput[k]!.seq <= lastSeq) this.pendingInputCharge -= inputCharge(this.pendingInput[k++]!);
    if (k > 0) this.pendingInput = this.pendingInput.slice(k);
  }

  private flushInput(): void {
    if (this.pendingInput.length === 0 || this.destroyed || this.savesInFlight > 0) return;
    const n = this.input.write(this.pendingInput);
    if (n > 0) {
      for (let i = 0; i < n; i++) this.pendingInputCharge -= inputCharge(this.pendingInput[i]!);
      this.pendingInput = n === this.pendingInput.length ? [] : this.pendingInput.slice(n);
      Atomics.add(this.ctl, ctl.wake, 1);
      Atomics.notify(this.ctl, ctl.wake);
      latencyTrace?.event('input:notify');
    }
    const first = this.pendingInput[0];
    if (first === undefined) return;
    if (!this.input.fits(first)) {
      // Cannot happen with socket-sized chunks; never let it block the input behind it.
      log.error(`dropping a ${first.kind} input event that does not fit the input ring (${limits.nicInputRingBytes} bytes)`);
      this.pendingInput.shift();
      this.pendingInputCharge -= inputCharge(first);
      this.flushInput();
      return;
    }
    // The vCPU has not read enough yet (a paused guest reads nothing): try again shortly.
    this.inputRetry ??= setTimeout(() => {
      this.inputRetry = null;
      this.flushInput();
    }, 1);
  }

  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    for (const w of this.waiters.splice(0)) w.reject(new MachineError('VM_DESTROYED', 'the machine was destroyed'));
    if (this.inputRetry !== null) clearTimeout(this.inputRetry);
    await this.worker.terminate();
    this.disk?.close();
    if (this.serialFd !== null && this.serialFd > 2) {
      try {
        fs.closeSync(this.serialFd);
      } catch {
        // already closed
      }
    }
  }

  private assertAlive(): void {
    if (this.destroyed) throw new MachineError('VM_DESTROYED', 'the machine was destroyed');
  }

  private expect(accept: (m: WorkerReply) => boolean, what: string, timeoutMs: number): Promise<WorkerReply> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        reject(new TimeoutError(`timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      const waiter = {
        accept,
        resolve: (m: WorkerReply) => {
          clearTimeout(timer);
          resolve(m);
        },
        reject: (e: Error) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      this.waiters.push(waiter);
    });
  }

  private onWorkerMessage(m: WorkerReply): void {
    switch (m.type) {
      case 'out':
        for (const out of decodeOutputBatch(m.outs)) this.emit('output', out);
        if (m.credits !== null) for (const c of m.credits) this.emit('credit', c);
        return;
      case 'direct-output-failed':
        this.emit('direct-output-failed', m.message);
        return;
      case 'listener-closed':
        this.emit('listener-closed');
        return;
      case 'serial':
        if (m.report.failing) log.warn(`writes to the serial console (${this.serialName}) fail: ${m.report.message}; the guest's console output is dropped until they work again`);
        else log.info(`writes to the serial console (${this.serialName}) work again; ${m.report.droppedBytes} bytes of console output were dropped`);
        return;
      case 'running':
        this.vcpuRunning = true;
        this.state = 'running';
        this.emit('resume');
        break;
      case 'paused':
        this.vcpuRunning = false;
        // A guest stopped by a disk error already said STOP (QEMU sends none for io-error → paused).
        if (this.state !== 'io-error') this.emit('stop');
        // The answer to a pause that timed out, which the vCPU saw before it was withdrawn.
        if (this.pauseInFlight === null && (this.state === 'running' || this.state === 'io-error')) this.state = 'paused';
        break;
      case 'io-error':
        if (m.action === 'report') {
          this.emit('io-error', { operation: m.operation, action: m.action, nospace: m.nospace, reason: m.reason } satisfies IoErrorReport);
          return;
        }
        if (this.state !== 'io-error') {
          this.stateBeforeIoError = this.state;
          this.state = 'io-error';
          this.emit('stop');
        }
        this.emit('io-error', { operation: m.operation, action: m.action, nospace: m.nospace, reason: m.reason } satisfies IoErrorReport);
        break;
      case 'io-resumed':
        if (this.state === 'io-error') {
          this.state = this.stateBeforeIoError;
          this.emit('resume');
        }
        this.emit('io-resumed');
        break;
      case 'exited':
        this.vcpuRunning = false;
        this.state = 'shutdown';
        this.exitCode = m.code;
        this.emit('shutdown', m.code);
        break;
      case 'panicked':
        this.vcpuRunning = false;
        this.state = 'guest-panicked';
        this.emit('panicked', m.message);
        // QEMU's panic action pause: GUEST_PANICKED, then the vm_stop's STOP (a client that
        // follows the run state by its events saw the crashed VM as running).
        this.emit('stop');
        break;
      default:
        break;
    }
    const i = this.waiters.findIndex((w) => w.accept(m));
    if (i >= 0) {
      const [w] = this.waiters.splice(i, 1);
      w!.resolve(m);
    }
  }

  private onWorkerFailure(err: Error): void {
    const wasRunning = this.vcpuRunning;
    this.vcpuRunning = false;
    this.state = 'internal-error';
    for (const w of this.waiters.splice(0)) w.reject(err);
    this.emit('panicked', err.message);
    // QEMU's vm_stop(RUN_STATE_INTERNAL_ERROR) says STOP, for a VM that was running.
    if (wasRunning) this.emit('stop');
  }
}

/**
 * Compile the guest with the optimizing tier from the start. V8 compiles WebAssembly with its
 * baseline compiler (Liftoff) first and swaps in optimized code only for later calls; it has no
 * on-stack replacement for WebAssembly. A guest's main loop is one call that never returns, so
 * under the default its own body would run baseline code forever (perf showed kv.wasm's
 * `_start` in Liftoff code). Functions it calls tier up anyway, so the measured effect is small
 * (an A/B of the machine bench's CPU-bound guest: 1.47-1.55 times the original module either
 * way); the cost is 35 ms of compiling for kv.wasm. The flag is
 * process-wide and read while compiling (lazy compilation would compile each function at its
 * first call, after the flag is back), so both are set for this synchronous, eager compile only.
 */
export function compileGuest(wasm: Uint8Array): WebAssembly.Module {
  v8.setFlagsFromString('--no-liftoff');
  v8.setFlagsFromString('--no-wasm-lazy-compilation');
  try {
    return new WebAssembly.Module(wasm);
  } finally {
    v8.setFlagsFromString('--liftoff');
    v8.setFlagsFromString('--wasm-lazy-compilation');
  }
}

export function computeLayout(guest: InstrumentedGuest, maximumPages: number): GuestLayout {
  const asyncifyBytes = limits.asyncifyStackBytes;
  const dirtyLogBytes = guest.storeLog ? Math.ceil((maximumPages * limits.wasmPageBytes) / limits.pageBytes) : 0;
  const reservedPages = Math.ceil((asyncifyBytes + dirtyLogBytes) / limits.wasmPageBytes);
  return {
    globals: guest.globals.map((g) => ({ exportName: g.exportName, type: g.type })),
    initialPages: guest.memory.initialPages,
    reservedPages,
    asyncifyBytes,
    storeLog: guest.storeLog,
    dirtyLogBytes,
    preemptBudget: limits.preemptBudget,
  };
}

/**
 * The guest's argv and environ as args_get and environ_get hand them over (each string with
 * its NUL) at most limits.guestArgsBytesMax together: a usage error at start, not a guest that
 * copies megabytes out of every args_get (the limit was never checked).
 */
export function checkGuestArgs(args: readonly string[], env: readonly string[]): void {
  let bytes = 0;
  for (const s of [...args, ...env]) bytes += Buffer.byteLength(s) + 1;
  if (bytes > limits.guestArgsBytesMax) {
    throw new UsageError(
      'GUEST_ARGS',
      `the guest's arguments and environment are ${bytes} bytes (${args.length} arguments, ${env.length} variables, with their NULs), above the limit of ${limits.guestArgsBytesMax}`,
    );
  }
}

/**
 * The serial console's fd is non-blocking, so that a console that takes nothing (a FIFO or a
 * terminal nobody reads) is Serial.write's EAGAIN and its wait, which lets a pause through: a
 * blocking write(2) held the vCPU, and every stop, checkpoint and migration timed out. A FIFO
 * without a reader is opened read-write (Linux allows it; the open neither fails nor blocks,
 * as a write-only one would, the whole process until a reader came): the output waits in the
 * pipe for one.
 */
function openSerialFile(file: string): number {
  const c = fs.constants;
  try {
    return fs.openSync(file, c.O_WRONLY | c.O_APPEND | c.O_CREAT | c.O_NONBLOCK, 0o666);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENXIO') throw err;
    return fs.openSync(file, c.O_RDWR | c.O_NONBLOCK);
  }
}

/**
 * The host's stdout for --serial stdio, non-blocking (see openSerialFile): a terminal or a pipe
 * is opened again (a file description of our own: the flag does not change the shell's), a
 * file or a socket (non-blocking already when it is Node's pipe) is used as it is.
 */
function nonBlockingStdout(): number {
  try {
    const st = fs.fstatSync(1);
    if (!st.isFIFO() && !st.isCharacterDevice()) return 1;
    return fs.openSync('/proc/self/fd/1', fs.constants.O_WRONLY | fs.constants.O_APPEND | fs.constants.O_NONBLOCK);
  } catch {
    return 1; // no /proc, or a pipe with no reader left: writes fail or go as before
  }
}
