/**
 * QmpServer: the control socket of one `colo run` process, speaking QEMU's QMP.
 *
 *   const qmp = new QmpServer();
 *   qmp.register({ name: 'migrate', args: { uri: 'str', '*detach': 'bool' },
 *                  handler: async ({ uri }) => { ... } });
 *   await qmp.listen('unix:/run/vm.qmp');
 *   qmp.emit('MIGRATION', { status: 'active' });
 *   await qmp.close();
 *
 * The protocol itself is QmpSession/QmpDispatcher (qmp-protocol.ts); this file only drives
 * sockets: one session per connection, flow control, output bound, client limit.
 */
import type { Duplex } from 'node:stream';
import { limits } from '../core/limits.js';
import { logger } from '../core/log.js';
import { formatAddress, listenOn, toAddress, type Listener, type SocketAddress } from './address.js';
import { QmpDispatcher, QmpSession, qmpLine, type QmpCommandSpec } from './qmp-protocol.js';
import type { QmpArgsSchema } from './qmp-schema.js';
import { coloVersion, versionTriple } from './version.js';

const log = logger('qmp');

export type { QmpCommandContext, QmpCommandSpec } from './qmp-protocol.js';
export type { QmpArgsSchema, QmpArgsOf, QmpType } from './qmp-schema.js';

export interface QmpServerOptions {
  /** Version reported in the greeting and by query-version (default: colo-vm's package version). */
  version?: string;
  clientsMax?: number;
  lineBytesMax?: number;
  pendingCommandsMax?: number;
  /** Unread output bytes of one client before it is disconnected. */
  outputBytesMax?: number;
  /** Sees every line received and sent, per client (for a debug qmp.log). */
  trace?: (clientId: number, direction: 'in' | 'out', line: string) => void;
}

export interface QmpTimestamp {
  seconds: number;
  microseconds: number;
}

/** Wall-clock ms = this + performance.now(): the monotonic clock, for microseconds. */
let wallClockOffsetMs = performance.timeOrigin;

/**
 * The wall clock in ms with a fraction. Date.now() has whole ms only; the monotonic clock has
 * the fraction but does not follow the wall clock when that is stepped (NTP's first sync after
 * boot, an administrator's `date`) or while the host is suspended: event timestamps, QEMU's
 * g_get_real_time(), would then be off by that much for the rest of the process's life. So the
 * monotonic clock is re-anchored whenever it parts from Date.now() by more than a ms.
 */
function wallClockMs(): number {
  const mono = performance.now();
  const wall = Date.now();
  const ms = wallClockOffsetMs + mono;
  if (ms >= wall - 1 && ms < wall + 2) return ms;
  wallClockOffsetMs = wall - mono;
  return wall;
}

/** Wall-clock time as QMP event timestamps carry it. */
export function qmpTimestamp(nowMs: number = wallClockMs()): QmpTimestamp {
  const us = Math.floor(nowMs * 1000);
  return { seconds: Math.floor(us / 1_000_000), microseconds: us % 1_000_000 };
}

interface Client {
  readonly session: QmpSession;
  readonly stream: Duplex;
  readonly closed: Promise<void>;
}

/** Ends a stream after its output is flushed; destroys it if that does not happen soon. */
function endStream(stream: Duplex): void {
  if (stream.destroyed) return;
  const timer = setTimeout(() => stream.destroy(), 1000);
  timer.unref();
  stream.once('close', () => clearTimeout(timer));
  stream.end(() => stream.destroy());
}

export class QmpServer {
  readonly version: string;
  private readonly dispatcher = new QmpDispatcher();
  private readonly clients = new Set<Client>();
  private readonly greeting: unknown;
  private listener: Listener | undefined;
  private nextClientId = 1;
  private closing: Promise<void> | undefined;

  constructor(private readonly options: QmpServerOptions = {}) {
    this.version = options.version ?? coloVersion();
    const versionInfo = { qemu: versionTriple(this.version), package: `colo-vm ${this.version}` };
    this.greeting = { QMP: { version: versionInfo, capabilities: ['oob'] } };
    this.dispatcher.register({ name: 'query-version', handler: () => versionInfo });
  }

  /** Adds a command; throws on a bad or duplicate name or a malformed schema. */
  register<const S extends QmpArgsSchema = {}>(spec: QmpCommandSpec<S>): void {
    this.dispatcher.register(spec);
  }

  /** Names of all commands, built-in ones included, in registration order. */
  commandNames(): string[] {
    return this.dispatcher.names();
  }

  /** Listens on `unix:PATH` or `tcp:HOST:PORT`; resolves with the address actually bound. */
  async listen(address: SocketAddress | string): Promise<SocketAddress> {
    if (this.closing !== undefined) throw new Error('QmpServer.listen after close');
    if (this.listener !== undefined) throw new Error(`QmpServer already listens on ${formatAddress(this.listener.address)}`);
    const listener = await listenOn(toAddress(address), { allowHalfOpen: true });
    this.listener = listener;
    listener.server.on('connection', (socket) => {
      if (listener.address.kind === 'tcp') socket.setNoDelay(true);
      this.serve(socket);
    });
    return listener.address;
  }

  /** The bound address, once listen() resolved. */
  get address(): SocketAddress | undefined {
    return this.listener?.address;
  }

  get clientCount(): number {
    return this.clients.size;
  }

  /**
   * Serves one connection (any duplex byte stream: a socket, or stdio joined with
   * Duplex.from). It should not end its writable side by itself when its input ends
   * (allowHalfOpen), so that replies to the last commands still go out.
   */
  serve(stream: Duplex): void {
    const outputBytesMax = this.options.outputBytesMax ?? limits.qmpOutputBytesMax;
    if (this.closing !== undefined) {
      stream.destroy();
      return;
    }
    const clientsMax = this.options.clientsMax ?? limits.qmpClientsMax;
    if (this.clients.size >= clientsMax) {
      stream.on('error', () => {});
      stream.write(qmpLine({ error: { class: 'GenericError', desc: `too many QMP clients (at most ${clientsMax})` } }));
      endStream(stream);
      return;
    }
    const clientId = this.nextClientId++;
    const trace = this.options.trace;
    const session = new QmpSession(
      this.dispatcher,
      {
        write: (line) => {
          if (stream.destroyed || !stream.writable) return;
          stream.write(line);
          if (stream.writableLength > outputBytesMax) {
            // Said in the log: the client (a management tool) only sees its connection go.
            log.warn(`QMP client ${clientId} disconnected: it left more than ${outputBytesMax} bytes of replies and events unread`);
            trace?.(clientId, 'out', `-- disconnected: more than ${outputBytesMax} bytes of output unread`);
            session.shutdown();
            stream.destroy();
          }
        },
        end: () => endStream(stream),
        setReading: (reading) => {
          if (reading) stream.resume();
          else stream.pause();
        },
      },
      {
        clientId,
        greeting: this.greeting,
        lineBytesMax: this.options.lineBytesMax ?? limits.qmpLineBytesMax,
        pendingCommandsMax: this.options.pendingCommandsMax ?? limits.qmpPendingCommandsMax,
        ...(trace === undefined ? {} : { trace: (direction, line) => trace(clientId, direction, line) }),
      },
    );
    const client: Client = {
      session,
      stream,
      closed: new Promise<void>((resolve) => stream.once('close', () => resolve())),
    };
    this.clients.add(client);
    stream.on('data', (chunk: Buffer) => session.receive(chunk));
    stream.on('end', () => session.endOfInput());
    stream.on('error', (err) => trace?.(clientId, 'in', `-- connection error: ${err.message}`));
    stream.once('close', () => {
      session.shutdown();
      this.clients.delete(client);
    });
    session.start();
  }

  /**
   * Sends `{"event": name, "data": data, "timestamp": {...}}` to every negotiated client
   * ("data" left out when undefined, as QEMU does for events without members). Returns how
   * many clients it was sent to.
   */
  emit(name: string, data?: Record<string, unknown>): number {
    if (this.closing !== undefined) return 0;
    const event: Record<string, unknown> = { event: name };
    if (data !== undefined) event.data = data;
    event.timestamp = qmpTimestamp();
    const line = qmpLine(event);
    let sent = 0;
    for (const client of this.clients) if (client.session.sendEvent(line)) sent++;
    return sent;
  }

  /** Stops listening and closes every client (after flushing what was already written). */
  close(): Promise<void> {
    this.closing ??= (async () => {
      const waits: Promise<void>[] = [];
      for (const client of this.clients) {
        client.session.shutdown();
        waits.push(client.closed);
        endStream(client.stream);
      }
      if (this.listener !== undefined) waits.push(this.listener.close());
      await Promise.all(waits);
    })();
    return this.closing;
  }
}
