/**
 * The SVM output channel (ARCHITECTURE §5 "Network"): one TCP connection, opened by the primary
 * to the secondary, on which the secondary's vCPU thread writes the SVM's output itself
 * (net-wire.ts encodeOutputFrames). SVM output then never passes through the secondary's main
 * thread: one thread wake-up and one message less per batch on the path every reply waits for.
 *
 * Setup: the secondary's vCPU thread listens on the address the primary reached it on (port 0);
 * the port goes in CHECKPOINT_READY. The primary connects and sends a hello: "COLOOUT1" and the
 * migration's 16-byte id. The secondary keeps the first connection with the right hello and
 * stops listening. From the next apply on (an epoch boundary: nothing of the old epoch can
 * follow) the vCPU writes there. Until then, and whenever the channel cannot be had or breaks,
 * SVM output goes on the main channel as coloNet frames, as before; the compare takes both.
 *
 * The secondary's end lives in the vCPU thread (vcpu-worker.ts), the one thread that writes to
 * it: its socket is opened, written and closed there, so no other thread can close the file
 * descriptor under a write (Node cannot hand a socket to another thread).
 *
 * The other way, the primary moves the mirror of client input here once the vCPU said it reads
 * it (a mirror-ready batch), at a checkpoint's capture (network.ts): the vCPU reads it while
 * the guest waits for input, and the secondary's main thread is off every request's path.
 */
import * as net from 'node:net';
import { StreamError } from '../core/errors.js';
import { connectTo } from '../control/address.js';
import { limits } from '../core/limits.js';

const magic = Buffer.from('COLOOUT1', 'latin1');
const helloBytes = magic.byteLength + 16;

function hello(migrationId: Uint8Array): Buffer {
  return Buffer.concat([magic, Buffer.from(migrationId)]);
}

/** The secondary's end: listens for the one connection of this COLO session. */
export class OutputListener {
  /** The connection, once a primary said the right hello; null if none came in time or closed. */
  readonly accepted: Promise<net.Socket | null>;
  private settle: (s: net.Socket | null) => void = () => undefined;
  private timer: NodeJS.Timeout | null = null;
  private done = false;

  private constructor(private readonly server: net.Server, readonly port: number, migrationId: Uint8Array, private readonly timeoutMs: number) {
    this.accepted = new Promise((resolve) => (this.settle = resolve));
    const want = hello(migrationId);
    server.on('connection', (s) => this.onConnection(s, want));
    server.on('error', () => this.finish(null));
    // No channel in time: output stays on the main channel. This thread's event loop runs
    // only while the vCPU is paused (the guest waits in Atomics.wait otherwise), so at the
    // first checkpoint after a long wait the timer is due before the loop has even accepted
    // the connection that was waiting in the kernel all along: it gives I/O its turns first.
    this.timer = setTimeout(() => afterIo(() => {
      this.timedOut = true;
      if (this.handshaking === 0) this.finish(null);
    }), timeoutMs);
  }

  /** The time for a connection ran out; a handshake under way may still complete. */
  private timedOut = false;

  /** Connections accepted whose hello is not complete yet. */
  private handshaking = 0;

  static async open(host: string, migrationId: Uint8Array, timeoutMs: number = limits.coloOutputChannelTimeoutMs): Promise<OutputListener> {
    const server = net.createServer({ noDelay: true });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host, port: 0 }, () => {
        server.removeListener('error', reject);
        resolve();
      });
    });
    const a = server.address();
    if (a === null || typeof a === 'string') throw new Error('the SVM output channel listener has no port');
    return new OutputListener(server, a.port, migrationId, timeoutMs);
  }

  /** Stop listening (and drop the connection if nobody took it). */
  close(): void {
    this.finish(null);
  }

  private onConnection(s: net.Socket, want: Buffer): void {
    if (this.done) {
      s.destroy();
      return;
    }
    s.setNoDelay(true);
    let got = Buffer.alloc(0);
    this.handshaking++;
    let handshaking = true;
    const ended = (): void => {
      if (!handshaking) return;
      handshaking = false;
      this.handshaking--;
      clearTimeout(timer);
      // The listener's own time may have run out while this one was in its handshake.
      if (this.timedOut && !this.done && this.handshaking === 0) this.finish(null);
    };
    // As the listener's: a hello that waited in the kernel while the thread could not run
    // gets its reads before the time is judged.
    const timer = setTimeout(() => afterIo(() => {
      if (!handshaking) return;
      s.destroy();
      ended();
    }), this.timeoutMs);
    const onData = (chunk: Buffer): void => {
      got = Buffer.concat([got, chunk]);
      if (got.byteLength < helloBytes) return;
      s.removeListener('data', onData);
      s.pause();
      // The primary sends nothing after its hello until the vCPU says it reads input here;
      // more, or another id, is not our primary.
      if (got.byteLength !== helloBytes || !got.equals(want) || this.done) {
        s.destroy();
        ended();
        return;
      }
      this.finish(s);
      ended();
    };
    s.on('data', onData);
    s.on('error', () => s.destroy());
    s.on('close', ended);
  }

  private finish(s: net.Socket | null): void {
    if (this.done) {
      s?.destroy();
      return;
    }
    this.done = true;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    this.server.close();
    this.settle(s);
  }
}

/**
 * Run `fn` after the event loop has been through its I/O phase a few times: connections and
 * data that were waiting in the kernel while the thread was blocked are handled first.
 */
function afterIo(fn: () => void, turns = 3): void {
  if (turns === 0) {
    fn();
    return;
  }
  setImmediate(() => afterIo(fn, turns - 1));
}

/** The primary's end: connect and say hello. What arrives is read by the caller. */
export async function connectOutputChannel(host: string, port: number, migrationId: Uint8Array, signal?: AbortSignal): Promise<net.Socket> {
  if (!Number.isInteger(port) || port <= 0 || port >= 65536) throw new StreamError('FRAME_INVALID', `CHECKPOINT_READY: bad output channel port ${port}`);
  const s = await connectTo({ kind: 'tcp', host, port }, limits.coloOutputChannelTimeoutMs, `the secondary's SVM output channel at ${host}:${port}`, signal);
  s.setNoDelay(true);
  s.write(hello(migrationId));
  return s;
}
