import net from 'node:net';
import { limits } from '../core/limits.js';
import { ChannelClosedError, ColoError, StreamError, TimeoutError, errorMessage } from '../core/errors.js';
import { encodePreamble, FrameDecoder, FrameEncoder, frameTypeName, jsonPayload, parseJsonPayload, type Frame } from './stream.js';
import { connectTo } from '../control/address.js';

/**
 * The main migration channel: one TCP connection carrying frames both ways (the source's
 * stream, and the destination's return direction). Each direction starts with the preamble
 * and numbers its own frames. TCP_NODELAY is on: control messages are small and must not
 * wait for Nagle and delayed ACKs (QEMU's COLO loses ~40 ms per checkpoint to that).
 *
 * Receiving is pull-based: `next()` hands out verified frames in order. While more than
 * limits.mainChannelQueueBytesMax bytes of frames wait unread, the socket stops reading.
 * The first decoding error or close ends the channel; every later `next()` rejects with it.
 */
export class MainChannel {
  readonly socket: net.Socket;
  private readonly encoder = new FrameEncoder();
  private readonly decoder = new FrameDecoder();
  private readonly queue: Frame[] = [];
  private queuedBytes = 0;
  private waiter: { resolve: (f: Frame) => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;
  private readonly closedPromise: Promise<void>;
  private readonly closeListeners = new Set<(err: Error) => void>();
  /** Bytes sent and received, frames and preamble included. */
  bytesSent = 0;
  bytesReceived = 0;

  constructor(socket: net.Socket, readonly peer: string) {
    this.socket = socket;
    socket.setNoDelay(true);
    this.closedPromise = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('end', () => this.onEnd());
    socket.on('error', (err) => this.fail(new ChannelClosedError(`the connection to ${peer} failed: ${err.message}`, { cause: err })));
    socket.on('close', () => this.fail(new ChannelClosedError(`the connection to ${peer} was closed`)));
    this.write([encodePreamble()]);
  }

  /** @param peer how messages name the other end, e.g. "the destination at 10.0.0.2:4444". */
  static async connect(host: string, port: number, peer = `${host}:${port}`, timeoutMs = limits.migrationConnectTimeoutMs, signal?: AbortSignal): Promise<MainChannel> {
    return new MainChannel(await connectTo({ kind: 'tcp', host, port }, timeoutMs, peer, signal), peer);
  }

  get closed(): boolean {
    return this.failure !== null;
  }

  /** Why the channel ended (null while open). */
  get error(): Error | null {
    return this.failure;
  }

  /** Called once when the channel ends, with the reason. */
  onClose(listener: (err: Error) => void): () => void {
    if (this.failure !== null) {
      const err = this.failure;
      queueMicrotask(() => listener(err));
      return () => undefined;
    }
    this.closeListeners.add(listener);
    return () => this.closeListeners.delete(listener);
  }

  // ---- sending ----

  /** Queue buffers on the socket (ignored once the channel ended). */
  write(bufs: readonly Buffer[]): void {
    if (this.failure !== null || this.socket.destroyed) return;
    if (bufs.length > 1) this.socket.cork();
    for (const b of bufs) {
      this.bytesSent += b.byteLength;
      this.socket.write(b);
    }
    if (bufs.length > 1) this.socket.uncork();
  }

  sendFrame(type: number, parts: readonly Uint8Array[], flags = 0): void {
    this.write(this.encoder.frame(type, parts, flags));
  }

  sendJson(type: number, value: unknown): void {
    this.write(this.encoder.frame(type, [jsonPayload(value)]));
  }

  /** The encoder, for section encoders that produce frames themselves (sections.ts). */
  get frames(): FrameEncoder {
    return this.encoder;
  }

  /** Bytes written and not yet handed to the kernel. */
  get unsentBytes(): number {
    return this.socket.writableLength;
  }

  /** Resolves when fewer than `bytes` are waiting in the socket's buffer. */
  async drain(bytes: number = limits.mainChannelWriteBufferBytesMax): Promise<void> {
    while (this.socket.writableLength > bytes) {
      if (this.failure !== null) throw this.failure;
      await new Promise<void>((resolve) => {
        const done = (): void => {
          this.socket.off('drain', done);
          this.socket.off('close', done);
          resolve();
        };
        this.socket.once('drain', done);
        this.socket.once('close', done);
      });
    }
    if (this.failure !== null) throw this.failure;
  }

  /** Resolves once everything written so far left for the kernel. */
  flush(): Promise<void> {
    if (this.failure !== null) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.socket.write(Buffer.alloc(0), (err) => (err ? reject(this.failure ?? new ChannelClosedError(errorMessage(err))) : resolve()));
    });
  }

  // ---- receiving ----

  /** The next frame; rejects when the channel ends, or after timeoutMs (the channel stays usable). */
  next(timeoutMs?: number, what = 'a frame'): Promise<Frame> {
    const f = this.queue.shift();
    if (f !== undefined) {
      this.dequeued(f);
      return Promise.resolve(f);
    }
    if (this.failure !== null) return Promise.reject(this.failure);
    if (this.waiter !== null) return Promise.reject(new Error('MainChannel.next: one reader at a time'));
    return new Promise<Frame>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      if (timeoutMs !== undefined) {
        timer = setTimeout(() => {
          this.waiter = null;
          reject(new TimeoutError(`timed out after ${timeoutMs} ms waiting for ${what} from ${this.peer}`));
        }, timeoutMs);
      }
      this.waiter = {
        resolve: (fr) => {
          clearTimeout(timer);
          resolve(fr);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
    });
  }

  /** Next frame as a JSON object of the given type. */
  async nextJson(type: number, timeoutMs?: number, what?: string): Promise<Record<string, unknown>> {
    const f = await this.next(timeoutMs, what);
    if (f.type !== type) throw new StreamError('FRAME_ORDER', `expected a ${frameTypeName(type)} frame from ${this.peer}, got ${frameTypeName(f.type)}`);
    return parseJsonPayload(f);
  }

  private onData(chunk: Buffer): void {
    if (this.failure !== null) return;
    this.bytesReceived += chunk.byteLength;
    this.decoder.push(chunk);
    try {
      for (let f = this.decoder.next(); f !== null; f = this.decoder.next()) this.deliver(f);
    } catch (err) {
      this.fail(err instanceof ColoError ? err : new StreamError('STREAM_INVALID', errorMessage(err)));
      this.socket.destroy();
    }
  }

  private deliver(f: Frame): void {
    if (this.waiter !== null) {
      const w = this.waiter;
      this.waiter = null;
      w.resolve(f);
      return;
    }
    this.queue.push(f);
    this.queuedBytes += f.payload.byteLength;
    if (this.queuedBytes > limits.mainChannelQueueBytesMax && !this.socket.isPaused()) this.socket.pause();
  }

  private dequeued(f: Frame): void {
    this.queuedBytes -= f.payload.byteLength;
    if (this.queuedBytes <= limits.mainChannelQueueBytesMax / 2 && this.socket.isPaused() && this.failure === null) this.socket.resume();
  }

  private onEnd(): void {
    try {
      this.decoder.finish();
    } catch (err) {
      this.fail(err as Error);
      return;
    }
    this.fail(new ChannelClosedError(`${this.peer} closed the connection`));
  }

  private fail(err: Error): void {
    if (this.failure !== null) return;
    this.failure = err;
    const w = this.waiter;
    this.waiter = null;
    w?.reject(err);
    for (const l of this.closeListeners) l(err);
    this.closeListeners.clear();
  }

  /** End the connection after pending writes (bounded), then release it. */
  async close(timeoutMs = 2000): Promise<void> {
    this.fail(new ChannelClosedError(`the channel to ${this.peer} was closed by this side`));
    if (!this.socket.destroyed) {
      const timer = setTimeout(() => this.socket.destroy(), timeoutMs);
      this.socket.end();
      await this.closedPromise;
      clearTimeout(timer);
    }
  }

  /** Abort the connection now. */
  destroy(err?: Error): void {
    this.fail(err ?? new ChannelClosedError(`the channel to ${this.peer} was closed by this side`));
    this.socket.destroy();
  }

  whenClosed(): Promise<void> {
    return this.closedPromise;
  }
}
