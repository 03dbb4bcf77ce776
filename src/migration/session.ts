import crypto from 'node:crypto';
import { limits } from '../core/limits.js';
import { ChannelClosedError, MigrationError, StreamError, errorMessage } from '../core/errors.js';
import * as v from '../core/validate.js';
import type { DirtyTracker } from '../machine/dirty.js';
import { ShadowDirtyTracker } from '../machine/dirty.js';
import type { Machine } from '../machine/machine.js';
import type { VcpuState } from '../machine/vcpu-protocol.js';
import { MainChannel } from './channel.js';
import { applyDiskFrame, chooseDiskMode, defaultDiskSink, diskIdentity, DiskSender, type DiskBlockSink, type DiskMode } from './disk-sync.js';
import { migrationIdHex, parseMigrationId } from './multifd-format.js';
import { MultifdReceiver, MultifdSender, type FullRound, type PageTarget } from './multifd.js';
import { encodeZeroRanges, fillRanges, mergePages, PageSink, pagesOf, pagesWrittenAtBoot, sendPagesPlain, zeroRangesPerFrameMax } from './ram.js';
import { splitKnownZero } from './zero.js';
import { RateLimit } from './rate.js';
import { deviceBlobOf } from './ram-digest.js';
import { applySetup, decodeDeviceState, encodeDeviceState, setupOf, type DeviceBlob } from './sections.js';
import type { RoundResult } from './source-core.js';
import type { MigrationCapabilities } from './params.js';
import { coloWireVersion, FrameType, frameTypeName, jsonPayload, parseJsonPayload, streamVersion, type Frame } from './stream.js';
import type { HelloInfo, ReplyMessage } from './destination-core.js';

/**
 * The transport of one migration, for each end: the main channel, the multifd channels, the
 * dirty tracker and the RAM/disk section writers. The precopy drivers (source.ts,
 * destination.ts) run on it, and COLO (colo/) keeps using it after the hand-off:
 *
 *   source:       collectDirty(), sendRound(), sendDeviceState(), sendColo(), nextColo()
 *   destination:  setPageTarget(), setDiskSink(), nextFrame() + applyFrame() / barrier(),
 *                 sendColo(), reply()
 */
export interface SourceSessionOptions {
  machine: Machine;
  tracker: DirtyTracker;
  host: string;
  port: number;
  /** Multifd channels, 0 for none. */
  channels: number;
  capabilities: MigrationCapabilities;
  name: string;
  /** Multifd senders spawned ahead of time (not connected), with `channels` workers; else spawned here. */
  senders?: MultifdSender | null;
}

type ReplyKind = 'ready' | 'loaded' | 'resumed';

export class SourceSession {
  readonly migrationId = new Uint8Array(crypto.randomBytes(16));
  channel: MainChannel | null = null;
  multifd: MultifdSender | null = null;
  disk: DiskSender;
  /** The last round number sent. */
  round = 0;
  /** Totals since the start (for `end`). */
  totals = { pages: 0, blocks: 0 };
  private readonly bootPages: Uint8Array;
  private announcedRamBytes = 0;
  private pendingPages: Uint32Array = new Uint32Array(0);
  private pendingBlocks: number[] = [];
  private readonly replies = new Map<ReplyKind, Record<string, unknown>>();
  private replyWaiter: { kind: ReplyKind; resolve: (r: Record<string, unknown>) => void; reject: (e: Error) => void } | null = null;
  private readonly coloFrames: Frame[] = [];
  private coloWaiter: { resolve: (f: Frame) => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;
  private readonly failureListeners = new Set<(err: Error) => void>();
  private ending = false;
  /** The throttle of the round being sent on the main channel: its pages (no multifd) and disk blocks. */
  private plainLimit: RateLimit | null = null;
  /** abort()'s reason (a cancel), for a main channel that connects only after it. */
  private abortReason: string | null = null;
  /** destroy() ran: a main channel that connects after it is dropped at once. */
  private dropped = false;
  /** Aborted by destroy(): a main channel still connecting is given up at once. */
  private readonly connecting = new AbortController();
  /** The round being sent (0: none) and where the main channel's byte count stood at its start. */
  private roundInFlight = 0;
  private roundMainStart = 0;
  /**
   * A COLO checkpoint's state, copied while the guest was paused (captureCheckpoint()), for
   * the next sendRound('dirty') and sendCapturedDeviceState().
   */
  private captured: { ramBytes: number; blocks: Buffer | null; device: DeviceBlob } | null = null;
  /** The copy of guest RAM captured pages are kept in (same offsets), and how many pages it ever held. */
  private copy: { memory: WebAssembly.Memory; pages: Uint8Array; held: number } | null = null;

  constructor(readonly opts: SourceSessionOptions) {
    this.bootPages = pagesWrittenAtBoot(opts.machine);
    this.disk = new DiskSender(opts.machine.disk, 'none');
  }

  get failed(): Error | null {
    return this.failure;
  }

  /** Called once, when a channel breaks or the destination reports an error. */
  onFailure(listener: (err: Error) => void): void {
    this.failureListeners.add(listener);
  }

  private fail(err: Error): void {
    if (this.failure !== null || this.ending) return;
    this.failure = err;
    for (const l of this.failureListeners) l(err);
    this.endWaits(err);
  }

  /**
   * A wait for the destination's answer ends with the migration. A cancel or a drop (yank,
   * quit) does not go through fail() (the session is ending): before, a handshake waiting on
   * a frozen destination for `ready` kept its timer, and the quitting process, for
   * limits.migrationHandshakeTimeoutMs.
   */
  private endWaits(err: Error): void {
    this.replyWaiter?.reject(err);
    this.replyWaiter = null;
    this.coloWaiter?.reject(err);
    this.coloWaiter = null;
  }

  /** Connect the main channel, say hello and setup, connect the multifd channels. */
  async connect(): Promise<void> {
    const m = this.opts.machine;
    if (this.opts.channels > 0) {
      // Worker threads start while the main channel handshakes (or started long before).
      const given = this.opts.senders ?? null;
      this.multifd =
        given !== null && given.channels === this.opts.channels && given.failed === null
          ? given
          : MultifdSender.spawn({
              memory: m.memory,
              channels: this.opts.channels,
              pagesMax: pagesOf(m.maximumPages * limits.wasmPageBytes),
              shadow: this.opts.tracker instanceof ShadowDirtyTracker ? this.opts.tracker.shadow : null,
            });
      if (given !== null && given !== this.multifd) void given.destroy();
      this.multifd.onFailure((err) => this.fail(err));
    }
    let channel: MainChannel;
    try {
      channel = await MainChannel.connect(this.opts.host, this.opts.port, `the destination at ${this.opts.host}:${this.opts.port}`, undefined, this.connecting.signal);
    } catch (err) {
      // Given up by destroy() (the process quitting, a yank): its reason is the migration's.
      if (this.dropped) throw this.failure ?? new ChannelClosedError('the migration ended while connecting');
      throw err;
    }
    if (this.ending) {
      // Cancelled (or yanked, failed) while the connection was on its way: abort() and
      // destroy() found no channel to close. Close this one, telling the destination of a
      // cancel, or it would take the hello below and wait for rounds that never come. It is
      // closed in the background as abort() closes its channel, and kept as the session's
      // channel, so that destroy() (the process quitting: MigrationControl.close) drops it:
      // closed where nothing kept it, it held the process's exit for the close's bound when
      // the destination did not close its end. After destroy() it is dropped at once.
      if (this.abortReason !== null && !this.dropped) {
        this.channel = channel;
        deliverAbort(channel, this.abortReason);
      } else channel.destroy();
      throw this.failure ?? new ChannelClosedError('the migration ended while connecting');
    }
    this.channel = channel;
    channel.onClose((err) => this.fail(err));
    void this.pumpReplies(channel);
    const hello: HelloInfo & { source: string } = {
      version: streamVersion,
      migrationId: migrationIdHex(this.migrationId),
      channels: this.opts.channels,
      capabilities: { ...this.opts.capabilities },
      ...(this.opts.capabilities['x-colo'] === true ? { colo: coloWireVersion } : {}),
      source: this.opts.name,
    };
    channel.sendJson(FrameType.hello, hello);
    // The size announced is the one the setup carries (read once: the guest may grow meanwhile).
    const setup = setupOf(m, { diskImage: m.disk === null ? null : diskIdentity(m.disk) });
    this.announcedRamBytes = setup.memoryPages * limits.wasmPageBytes;
    channel.sendJson(FrameType.setup, setup);
    const ready = await this.waitReply('ready', limits.migrationHandshakeTimeoutMs, 'the destination to accept the setup');
    if (this.ending) throw this.failure ?? new ChannelClosedError('the migration ended while connecting');
    // The destination checked the COLO version of the hello; one of an older build did not
    // (it ignores the field) and names none here: it would misread COLO's newer messages.
    if (this.opts.capabilities['x-colo'] === true && ready.colo !== coloWireVersion) {
      const theirs = typeof ready.colo === 'number' ? `COLO protocol version ${ready.colo}` : 'no COLO protocol version (an older build)';
      throw new MigrationError('COLO_VERSION_MISMATCH', `the destination speaks ${theirs}, this source ${coloWireVersion}`);
    }
    const mode = ready.disk;
    if (mode !== 'full' && mode !== 'overlay' && mode !== 'shared' && mode !== 'none') throw new StreamError('FRAME_INVALID', `ready: bad disk mode ${String(mode)}`);
    this.disk = new DiskSender(m.disk, mode);
    if (this.multifd !== null) {
      const ports = ready.channelPorts;
      if (!Array.isArray(ports) || ports.length !== this.opts.channels || !ports.every((p) => Number.isInteger(p) && p > 0 && p < 65536)) {
        throw new StreamError('FRAME_INVALID', `ready: expected ${this.opts.channels} channel ports`);
      }
      await this.multifd.connect(this.opts.host, ports as number[], this.migrationId);
    }
  }

  private async pumpReplies(channel: MainChannel): Promise<void> {
    for (;;) {
      let f: Frame;
      try {
        f = await channel.next();
      } catch {
        return; // onClose reports it
      }
      try {
        if (f.type === FrameType.colo || f.type === FrameType.coloNet) {
          if (this.coloWaiter !== null) {
            const w = this.coloWaiter;
            this.coloWaiter = null;
            w.resolve(f);
          } else this.coloFrames.push(f);
          continue;
        }
        if (f.type !== FrameType.reply) throw new StreamError('FRAME_ORDER', `unexpected ${frameTypeName(f.type)} frame on the return direction`);
        const r = parseJsonPayload(f);
        const kind = r.kind;
        if (kind === 'refuse') throw new MigrationError('DESTINATION_REFUSED', `the destination refused the migration: ${String(r.message)}`);
        // The destination's own code (DRIVE_LOCKED, DISK_FULL, ...) is the cause error-desc names;
        // an older destination sends none, and anything that is not a code is not taken.
        if (kind === 'error') throw new MigrationError(peerCode(r.code) ?? 'DESTINATION_FAILED', `the destination failed: ${String(r.message)}`);
        if (kind !== 'ready' && kind !== 'loaded' && kind !== 'resumed') throw new StreamError('FRAME_INVALID', `unknown reply ${String(kind)}`);
        if (this.replyWaiter !== null && this.replyWaiter.kind === kind) {
          const w = this.replyWaiter;
          this.replyWaiter = null;
          w.resolve(r);
        } else this.replies.set(kind, r);
      } catch (err) {
        this.fail(err instanceof Error ? err : new Error(String(err)));
        channel.destroy();
        return;
      }
    }
  }

  /** Wait for a reply of the destination. */
  waitReply(kind: ReplyKind, timeoutMs: number, what: string): Promise<Record<string, unknown>> {
    const have = this.replies.get(kind);
    if (have !== undefined) {
      this.replies.delete(kind);
      return Promise.resolve(have);
    }
    if (this.failure !== null) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.replyWaiter = null;
        reject(new MigrationError('DESTINATION_TIMEOUT', `timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      this.replyWaiter = {
        kind,
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
    });
  }

  private requireChannel(): MainChannel {
    if (this.failure !== null) throw this.failure;
    if (this.channel === null) throw new ChannelClosedError('the migration is not connected');
    return this.channel;
  }

  /**
   * Collect the pages and disk blocks dirtied since the last collect (or round 1) and add
   * them to what the next sendRound('dirty') sends. Returns the totals pending.
   */
  collectDirty(): { pages: number; blocks: number } {
    const m = this.opts.machine;
    const dirty = this.opts.tracker.collect(m.ram(), m.statePageRanges());
    this.pendingPages = this.pendingPages.length === 0 ? dirty : mergePages(this.pendingPages, dirty);
    const blocks = this.disk.nextRound();
    if (blocks.length > 0) this.pendingBlocks = [...new Set([...this.pendingBlocks, ...blocks])].sort((a, b) => a - b);
    return { pages: this.pendingPages.length, blocks: this.pendingBlocks.length };
  }

  /**
   * COLO: collect what the guest dirtied and copy it (pages, disk blocks) together with the
   * device state for `vcpu`, so that the guest may run on while sendRound('dirty') and
   * sendCapturedDeviceState() send the copy. The guest must be paused. Returns false, having
   * only collected, when the pages or the disk blocks exceed limits.coloCheckpointCopyBytesMax:
   * then send from guest RAM and the disk with the guest still paused, as a precopy round does.
   */
  captureCheckpoint(vcpu: VcpuState): boolean {
    const m = this.opts.machine;
    const { pages, blocks } = this.collectDirty();
    const pageBytes = limits.pageBytes;
    if (pages * pageBytes > limits.coloCheckpointCopyBytesMax) return false;
    // The blocks' copy is one buffer per checkpoint: a guest writing its disk fast would make
    // it as large as the disk (up to limits.diskBytesMax).
    if (blocks * limits.diskBlockBytes > limits.coloCheckpointCopyBytesMax) return false;
    const ram = m.ram();
    const wasmPages = ram.byteLength / limits.wasmPageBytes;
    let copy = this.copy;
    const list = this.pendingPages;
    if (copy !== null) {
      let fresh = 0;
      for (const p of list) if (copy.pages[p] === 0) fresh++;
      // The copy's resident size is every page it ever held: start a new one past the bound.
      if ((copy.held + fresh) * pageBytes > limits.coloCheckpointCopyBytesMax) copy = null;
    }
    if (copy === null) {
      copy = {
        memory: new WebAssembly.Memory({ initial: wasmPages, maximum: m.maximumPages, shared: true }),
        pages: new Uint8Array(pagesOf(m.maximumPages * limits.wasmPageBytes)),
        held: 0,
      };
      this.copy = copy;
    }
    const have = copy.memory.buffer.byteLength / limits.wasmPageBytes;
    if (have < wasmPages) copy.memory.grow(wasmPages - have);
    const to = new Uint8Array(copy.memory.buffer);
    // Runs of consecutive pages in one copy each.
    for (let i = 0; i < list.length; ) {
      let j = i + 1;
      while (j < list.length && list[j] === list[j - 1]! + 1) j++;
      const from = list[i]! * pageBytes;
      const end = (list[j - 1]! + 1) * pageBytes;
      to.set(ram.subarray(from, end), from);
      for (let k = i; k < j; k++) {
        if (copy.pages[list[k]!] === 0) {
          copy.pages[list[k]!] = 1;
          copy.held++;
        }
      }
      i = j;
    }
    this.captured = { ramBytes: m.statePages() * limits.wasmPageBytes, blocks: this.disk.capture(this.pendingBlocks), device: deviceBlobOf(m, vcpu) };
    return true;
  }

  /**
   * Send one round: 'full' = every page of guest RAM and round 1's disk blocks (starts dirty
   * tracking), 'dirty' = what collectDirty() gathered. Ends with roundEnd on the main channel
   * after every multifd channel wrote its SYNC.
   */
  /**
   * One round. `pipelined` (COLO checkpoints): with multifd, roundEnd follows as soon as the
   * channels have the round, without waiting for them to finish writing; the destination's
   * barrier waits for their SYNCs anyway. The channels' bytes then come in `multifdBytes`.
   */
  async sendRound(kind: 'full' | 'dirty', bytesPerSecond = 0, pipelined = false): Promise<RoundResult & { multifdBytes?: Promise<number> }> {
    const channel = this.requireChannel();
    const m = this.opts.machine;
    const started = performance.now();
    const round = this.round + 1;
    // A captured checkpoint is sent from its copy, as it was at the guest's pause.
    const captured = kind === 'dirty' ? this.captured : null;
    const source = captured !== null ? this.copy!.memory : m.memory;
    // The state's memory (Machine.statePages), not the memory's size: above it all is zero.
    const ramBytes = captured !== null ? captured.ramBytes : m.statePages() * limits.wasmPageBytes;
    if (ramBytes !== this.announcedRamBytes) {
      channel.sendJson(FrameType.ramSize, { pages: ramBytes / limits.wasmPageBytes });
      this.announcedRamBytes = ramBytes;
    }
    const tracker = this.opts.tracker;
    let blocks: number[];
    let fill: (list: Uint32Array) => number;
    let full: FullRound | null = null;
    let knownZeroPages = 0;
    if (kind === 'full') {
      // The guest may grow its memory while this runs: send exactly the RAM announced above,
      // never a page the destination has not been told to make room for (its receive
      // workers would wait for a growth announced only after this round's barrier).
      const announcedPages = ramBytes / limits.pageBytes;
      const ranges = m.statePageRanges()
        .map(([a, b]) => [a, Math.min(b, announcedPages)] as [number, number])
        .filter(([a, b]) => b > a);
      tracker.beginFullSend(m.ram(), ranges);
      blocks = this.disk.firstRound();
      // Pages the store log never saw written (and boot did not write) go as ranges on the
      // main channel, unread; the channels take the rest.
      const split = splitKnownZero(ranges, tracker.writtenMap(), this.bootPages);
      for (let i = 0; i < split.zero.length; i += zeroRangesPerFrameMax) {
        const part = split.zero.slice(i, i + zeroRangesPerFrameMax);
        channel.sendFrame(FrameType.ramZeroRanges, [encodeZeroRanges(part)]);
        for (const [a, b] of part) knownZeroPages += b - a;
      }
      fill = (list) => fillRanges(list, split.data);
      full = { ranges: split.data };
      this.pendingPages = new Uint32Array(0);
    } else {
      const pages = this.pendingPages;
      blocks = this.pendingBlocks;
      fill = (list) => {
        list.set(pages);
        return pages.length;
      };
      this.pendingPages = new Uint32Array(0);
    }
    this.pendingBlocks = [];
    const mainBefore = channel.bytesSent;
    this.roundInFlight = round;
    this.roundMainStart = mainBefore;
    let normalPages = 0;
    let zeroPages = 0;
    let multifdBytes = 0;
    let count: number;
    let roundChannels = 0;
    let pendingMultifd: Promise<number> | undefined;
    if (this.multifd !== null) {
      let listCount = full === null ? 0 : full.ranges.reduce((n, [a, b]) => n + (b - a), 0);
      // Throttled, the disk blocks go first, within max-bandwidth, and the pages after them:
      // sent beside the workers' pages (each channel paced to its share) they went unpaced,
      // and the round took the bandwidth and the disk's bytes on top. Under a limit the link
      // is the bottleneck, so the round takes as long either way.
      let blocksFirst = false;
      let pagesRate = bytesPerSecond;
      if (bytesPerSecond > 0 && blocks.length > 0 && !pipelined) {
        const limit = new RateLimit(bytesPerSecond);
        this.plainLimit = limit;
        try {
          await this.disk.send(channel, blocks, captured?.blocks ?? null, limit, mainBefore);
        } finally {
          this.plainLimit = null;
        }
        blocksFirst = true;
        // A max-bandwidth set while the blocks went (setBandwidth) is the pages' rate.
        pagesRate = limit.rate;
      }
      const handed = await this.multifd.startRound(round, full ?? ((list) => (listCount = fill(list))), pagesRate, captured !== null ? source : undefined);
      roundChannels = handed.channels;
      // Disk blocks go on the main channel while the workers send pages.
      const diskSent = blocksFirst ? Promise.resolve(blocks.length) : this.disk.send(channel, blocks, captured?.blocks ?? null);
      count = listCount + knownZeroPages;
      if (pipelined) {
        await diskSent;
        pendingMultifd = handed.done.then((r) => r.bytes);
        normalPages = listCount; // zero pages among them are counted by the workers, later
        zeroPages = knownZeroPages;
      } else {
        const [r] = await Promise.all([handed.done, diskSent]);
        normalPages = r.normalPages;
        zeroPages = r.zeroPages + knownZeroPages;
        multifdBytes = r.bytes;
      }
    } else {
      const list = new Uint32Array(pagesOf(m.maximumPages * limits.wasmPageBytes));
      count = fill(list);
      const noteSent = tracker.kind === 'shadow' ? (p: number, d: Uint8Array | null) => tracker.noteSent(p, d) : null;
      const limit = new RateLimit(bytesPerSecond);
      this.plainLimit = limit;
      let r: Awaited<ReturnType<typeof sendPagesPlain>>;
      try {
        r = await sendPagesPlain(channel, source, list, count, noteSent, limit);
        // The disk blocks are part of the round's bytes under max-bandwidth, as the pages are.
        await this.disk.send(channel, blocks, captured?.blocks ?? null, limit, mainBefore);
      } finally {
        this.plainLimit = null;
      }
      count += knownZeroPages;
      normalPages = r.normalPages;
      zeroPages = r.zeroPages + knownZeroPages;
    }
    channel.sendJson(FrameType.roundEnd, { round, pages: count, blocks: blocks.length, channels: roundChannels });
    this.round = round;
    this.roundInFlight = 0;
    this.totals.pages += count;
    this.totals.blocks += blocks.length;
    return {
      round,
      bytes: channel.bytesSent - mainBefore + multifdBytes,
      normalPages,
      zeroPages,
      diskBlocks: blocks.length,
      durationMs: performance.now() - started,
      multifdChannelBytes: multifdBytes,
      ...(pendingMultifd !== undefined ? { multifdBytes: pendingMultifd } : {}),
    };
  }

  /**
   * max-bandwidth changed (bytes/s, 0 = no limit): the pages of the round being sent go at
   * this rate from now on (the caller does not call it during an unthrottled round).
   */
  setBandwidth(bytesPerSecond: number): void {
    this.plainLimit?.set(bytesPerSecond);
    this.multifd?.setBandwidth(bytesPerSecond);
  }

  /** Bytes of the round being sent, so far (query-migrate shows progress inside a round). */
  bytesInFlight(): number {
    if (this.roundInFlight === 0 || this.channel === null) return 0;
    return this.channel.bytesSent - this.roundMainStart + (this.multifd?.roundBytes(this.roundInFlight) ?? 0);
  }

  sendDeviceState(vcpu: VcpuState): number {
    return this.writeDeviceState(deviceBlobOf(this.opts.machine, vcpu));
  }

  /** The device state captureCheckpoint() took, after its round; ends the captured checkpoint. */
  sendCapturedDeviceState(): number {
    const device = this.captured?.device ?? null;
    if (device === null) throw new MigrationError('CHECKPOINT_ORDER', 'no captured checkpoint to send the device state of');
    this.captured = null;
    return this.writeDeviceState(device);
  }

  private writeDeviceState(blob: DeviceBlob): number {
    const channel = this.requireChannel();
    const frames = encodeDeviceState(channel.frames, blob);
    channel.write(frames);
    return frames.reduce((n, b) => n + b.byteLength, 0);
  }

  sendEnd(): void {
    this.requireChannel().sendJson(FrameType.end, { rounds: this.round, pages: this.totals.pages, blocks: this.totals.blocks });
  }

  /**
   * The switchover: the destination takes over (and runs the guest if `run`, i.e. the VM was
   * running here when stop-and-copy paused it — as QEMU carries the run state); the source
   * must not run after this.
   */
  sendGo(run: boolean): void {
    this.requireChannel().sendJson(FrameType.switchover, { run });
  }

  /** COLO: a control message to the destination. */
  sendColo(value: Record<string, unknown>, data?: Uint8Array): void {
    const parts: Uint8Array[] = [jsonPayload(value)];
    if (data !== undefined) parts.push(data);
    this.requireChannel().sendFrame(FrameType.colo, parts);
  }

  /** COLO: a network event batch (colo/net-wire.ts) to the destination. */
  sendColoNet(payload: Uint8Array): void {
    this.requireChannel().sendFrame(FrameType.coloNet, [payload]);
  }

  /**
   * A count that grows whenever something moves between the nodes: bytes of the main channel
   * the kernel took, bytes received from the destination, packets the multifd channels wrote.
   * COLO's checkpoint watchdog compares it over time (limits.coloCheckpointStallMs).
   */
  progress(): number {
    const c = this.channel;
    const main = c === null ? 0 : c.bytesSent - c.unsentBytes + c.bytesReceived;
    return main + (this.multifd?.activity ?? 0);
  }

  /** Bytes queued on the main channel that the kernel has not taken yet (0 without a channel). */
  get mainUnsentBytes(): number {
    return this.channel?.unsentBytes ?? 0;
  }

  /** COLO: the next colo or coloNet frame from the destination. */
  nextColo(): Promise<Frame> {
    const f = this.coloFrames.shift();
    if (f !== undefined) return Promise.resolve(f);
    if (this.failure !== null) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => (this.coloWaiter = { resolve, reject }));
  }

  /**
   * Cancel: tell the destination (so it logs a cancel, not an error), then close. The abort
   * frame goes behind whatever of the stream is still queued (a plain channel holds up to
   * limits.mainChannelWriteBufferBytesMax of pages, and the kernel more): dropped after a
   * short bound, as before, the queue went with it when the destination read slowly or had
   * stopped reading for a moment, and the destination saw a stream cut inside a frame, which
   * is what a crashed source looks like (STREAM_TRUNCATED, an error). So the channel is
   * closed in the background, bounded by limits.migrationAbortDeliveryMs: it ends when the
   * destination, having read up to the abort, closes its end. destroy() drops it at once.
   */
  async abort(reason: string): Promise<void> {
    this.ending = true;
    this.abortReason = reason;
    this.plainLimit?.stop();
    this.endWaits(new ChannelClosedError(`the migration was ${reason}`));
    if (this.channel !== null) deliverAbort(this.channel, reason);
    await this.multifd?.destroy();
  }

  /** Close after everything was written (a finished migration). */
  async close(): Promise<void> {
    this.ending = true;
    await Promise.all([this.multifd?.close(), this.channel?.close()]);
  }

  /** Drop every channel now (failure, yank). */
  async destroy(err?: Error): Promise<void> {
    if (err !== undefined) this.fail(err);
    this.ending = true;
    this.dropped = true;
    // A connect still pending (a destination that drops SYNs, or whose accept queue is full)
    // held its socket and timer, and the quitting process, for limits.migrationConnectTimeoutMs.
    this.connecting.abort();
    // A round waiting for max-bandwidth would otherwise hold its timer (and the process) that long.
    this.plainLimit?.stop();
    this.endWaits(this.failure ?? new ChannelClosedError('the migration channels were dropped'));
    this.channel?.destroy();
    await this.multifd?.destroy();
  }
}

/** A stable error code sent by the peer (upper case, digits and _), or null. */
function peerCode(x: unknown): string | null {
  return typeof x === 'string' && /^[A-Z][A-Z0-9_]{0,63}$/.test(x) ? x : null;
}

/**
 * A cancel's abort frame, behind whatever of the stream is still queued, and the channel
 * closed in the background: it ends when the destination, having read up to the abort, closes
 * its end, or after limits.migrationAbortDeliveryMs (SourceSession.abort).
 */
function deliverAbort(channel: MainChannel, reason: string): void {
  try {
    channel.sendJson(FrameType.abort, { reason });
  } catch {
    // closing anyway
  }
  void channel.close(limits.migrationAbortDeliveryMs);
}

/** Options of the destination's transport. */
export interface IncomingSessionOptions {
  machine: Machine;
  capabilities: MigrationCapabilities;
  /** Multifd receivers spawned when the destination started listening (used if the source asks for as many channels). */
  receivers?: MultifdReceiver | null;
}

export class IncomingSession {
  receiver: MultifdReceiver | null = null;
  readonly pageSink: PageSink;
  /** Guest RAM size in 4 KiB pages, shared with the multifd receivers (they wait on it). */
  readonly ramPagesWord: SharedArrayBuffer;
  readonly maybeNonZero: SharedArrayBuffer;
  private target: PageTarget = { ram: true, cache: null, received: null };
  private diskSink: DiskBlockSink | null;
  device: DeviceBlob | null = null;
  diskMode: DiskMode = 'none';
  private readonly pagesMax: number;
  /** The error of a multifd receiver, a corrupt, truncated or reordered packet before a closed channel. */
  get receiverFailure(): Error | null {
    return this.receiver?.cause ?? null;
  }
  private readonly failureListeners = new Set<(err: Error) => void>();

  /** The source's id for this migration (from its hello; set by prepare). */
  migrationId: Uint8Array | null = null;

  /** The address the source reached this node on: where further channels listen. */
  get localHost(): string {
    const host = this.channel.socket.localAddress ?? '127.0.0.1';
    return host.startsWith('::ffff:') ? host.slice(7) : host;
  }

  constructor(readonly channel: MainChannel, readonly opts: IncomingSessionOptions) {
    const m = opts.machine;
    this.ramPagesWord = opts.receivers?.ramPages ?? new SharedArrayBuffer(4);
    this.pagesMax = pagesOf(m.maximumPages * limits.wasmPageBytes);
    // Fresh destination RAM is zero except what boot wrote: zero pages there cost nothing.
    this.maybeNonZero = new SharedArrayBuffer(this.pagesMax);
    new Uint8Array(this.maybeNonZero).set(pagesWrittenAtBoot(m));
    this.pageSink = new PageSink(m.memory, this.pagesMax, this.target, this.maybeNonZero);
    this.diskSink = m.disk === null ? null : defaultDiskSink(m.disk);
    this.publishRamSize();
  }

  private publishRamSize(): void {
    const word = new Int32Array(this.ramPagesWord);
    Atomics.store(word, 0, pagesOf(this.opts.machine.ram().byteLength));
    Atomics.notify(word, 0);
  }

  /**
   * Check the source's setup against this machine (module, layout, disk), grow RAM, choose
   * the disk mode and start the multifd receivers. Returns what the `ready` reply carries.
   */
  async prepare(setup: Frame, channels: number, migrationId: string): Promise<{ channelPorts: number[]; disk: DiskMode }> {
    const m = this.opts.machine;
    const id = parseMigrationId(migrationId);
    this.migrationId = id;
    const info = applySetup(m, setup);
    this.publishRamSize();
    this.diskMode = chooseDiskMode(info.diskImage, m.disk);
    // The image opened unlocked (QEMU's inactive image of -incoming): this destination uses
    // it from now on, so it takes its lock now, write or (--snapshot) read (ImageLockError:
    // another live process uses it). 'shared': the source's image itself, which the source holds until
    // stop-and-copy; taken when the state is loaded (IncomingMigration's restore).
    if (this.diskMode !== 'shared') m.disk?.activate();
    const ports: number[] = [];
    const spare = this.opts.receivers ?? null;
    if (channels > 0) {
      if (spare !== null && spare.channels === channels && spare.ramPages === this.ramPagesWord) {
        this.receiver = spare;
        await spare.configure(id, this.target, this.maybeNonZero);
      } else {
        if (spare !== null) void spare.destroy();
        this.receiver = await MultifdReceiver.start({
          memory: m.memory,
          host: this.localHost,
          migrationId: id,
          channels,
          pagesMax: this.pagesMax,
          ramPages: this.ramPagesWord,
          ramMaybeNonZero: this.maybeNonZero,
          target: this.target,
        });
      }
      this.receiver.onFailure((err) => {
        for (const l of this.failureListeners) l(err);
      });
      ports.push(...this.receiver.ports);
    } else if (spare !== null) {
      void spare.destroy();
    }
    return { channelPorts: ports, disk: this.diskMode };
  }

  /** Called when a multifd channel fails (corrupt, truncated, reordered or closed). */
  onFailure(listener: (err: Error) => void): void {
    this.failureListeners.add(listener);
  }

  /** The next frame on the main channel. */
  nextFrame(): Promise<Frame> {
    return this.channel.next();
  }

  /**
   * Apply a ramSize, page or disk frame; returns how many pages or blocks it held (0 for
   * ramSize). Other frames are refused.
   */
  applyFrame(f: Frame): number {
    switch (f.type) {
      case FrameType.ramSize: {
        const r = parseJsonPayload(f);
        let pages: number;
        try {
          pages = v.uint(r.pages, 'ramSize.pages', 65536);
        } catch (err) {
          throw new StreamError('FRAME_INVALID', errorMessage(err));
        }
        this.opts.machine.growRamTo(pages);
        this.publishRamSize();
        return 0;
      }
      case FrameType.ramPages:
      case FrameType.ramZero:
      case FrameType.ramZeroRanges:
        return this.pageSink.apply(f);
      case FrameType.diskBlocks:
      case FrameType.diskZero: {
        const disk = this.opts.machine.disk;
        if (disk === null || this.diskSink === null) throw new StreamError('FRAME_ORDER', 'disk blocks for a machine without a drive');
        if (this.diskMode === 'shared') throw new StreamError('FRAME_ORDER', 'disk blocks although both ends share the image');
        return applyDiskFrame(f, disk.blockCount, this.diskSink);
      }
      case FrameType.deviceState:
        this.device = decodeDeviceState(f);
        return 0;
      default:
        throw new StreamError('FRAME_ORDER', `${frameTypeName(f.type)} is not a section frame`);
    }
  }

  /** The first `channels` multifd channels (all: -1) delivered SYNC(round); resolves with their pages and bytes. */
  async barrier(round: number, channels = -1): Promise<{ pages: number; bytes: number }> {
    if (this.receiver === null) return { pages: 0, bytes: 0 };
    // The SYNCs of a source that is gone never come: its main channel's end fails the wait.
    let off: () => void = () => undefined;
    const gone = new Promise<never>((_resolve, reject) => {
      off = this.channel.onClose(reject);
    });
    try {
      return await Promise.race([this.receiver.barrier(round, channels), gone]);
    } finally {
      off();
    }
  }

  /**
   * COLO hook (b): where received pages go from now on — guest RAM, a cache, and a byte map
   * recording each page received (Atomics.store of 1). Applies to the main channel and to
   * every multifd worker; resolves once all of them use it. Call it between rounds.
   */
  async setPageTarget(target: PageTarget): Promise<void> {
    this.target = target;
    this.pageSink.setTarget(target);
    await this.receiver?.setTarget(target);
  }

  /**
   * COLO has ended here (a takeover, or a secondary that left), its channels destroyed: no page
   * comes any more, so the session lets go of the RAM cache and the received map (the cache is
   * as large as guest RAM). A page frame still applied would go nowhere, never into guest RAM
   * (invariant 2). No receiver is asked: its threads are gone with the channels.
   */
  dropPageTarget(): void {
    this.target = { ram: false, cache: null, received: null };
    this.pageSink.setTarget(this.target);
  }

  /** COLO: where received disk blocks go (null: the machine's disk). */
  setDiskSink(sink: DiskBlockSink | null): void {
    const disk = this.opts.machine.disk;
    this.diskSink = sink ?? (disk === null ? null : defaultDiskSink(disk));
  }

  reply(message: ReplyMessage): void {
    this.channel.sendJson(FrameType.reply, message);
  }

  sendColo(value: Record<string, unknown>, data?: Uint8Array): void {
    const parts: Uint8Array[] = [jsonPayload(value)];
    if (data !== undefined) parts.push(data);
    this.channel.sendFrame(FrameType.colo, parts);
  }

  /** COLO: a network event batch (colo/net-wire.ts) to the source. */
  sendColoNet(payload: Uint8Array): void {
    this.channel.sendFrame(FrameType.coloNet, [payload]);
  }

  async close(): Promise<void> {
    await Promise.all([this.receiver?.close(), this.channel.close()]);
  }

  async destroy(): Promise<void> {
    this.channel.destroy();
    // The spare receivers started with the listener are this session's until prepare() takes
    // them (or sets them aside): a migration that fails before that must end their threads too.
    const spare = this.opts.receivers ?? null;
    await Promise.all([this.receiver?.destroy(), spare !== this.receiver ? spare?.destroy() : undefined]);
  }
}
