import net from 'node:net';
import { EventEmitter } from 'node:events';
import { limits } from '../core/limits.js';
import { latencyTrace } from '../core/latency-trace.js';
import { UsageError } from '../core/errors.js';
import { logger } from '../core/log.js';
import type { NicInput, NicOutput } from './nic.js';

/**
 * Why the front end stops reading its clients: the VM is paused (a switchover, a checkpoint),
 * the COLO compare holds too much output, or the COLO secondary is too far behind in reading
 * the mirrored input.
 */
export type ReadingPause = 'vm' | 'compare' | 'mirror' | 'svm-input';

const log = logger('net');

export interface ListenAddress {
  host: string;
  port: number;
}

export function parseListen(spec: string): ListenAddress {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(spec);
  if (m === null) throw new UsageError('NET_ADDRESS', `bad listen address '${spec}': expected HOST:PORT`);
  const port = Number(m[3]);
  if (port > 65535) throw new UsageError('NET_ADDRESS', `bad port in '${spec}'`);
  return { host: (m[1] ?? m[2])!, port };
}

/** HOST:PORT as parseListen reads it back: an IPv6 host in brackets. */
export function formatListen(a: ListenAddress): string {
  return `${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}`;
}

interface ClientConn {
  id: number;
  socket: net.Socket;
  /** Next output offset expected from the guest for this connection. */
  outOffset: number;
  /** The guest closed the connection. */
  ended: boolean;
  /** The guest was told the client went away. */
  eofSent: boolean;
  /** Input on its way to the guest and not yet consumed there (bytes plus event charges; flow control). */
  inFlight: number;
  /** Reading stopped: too much input in flight, or too much output the client has not read. */
  inputHeld: boolean;
  outputHeld: boolean;
  /** The front end reset the client (resetUnread): input it had not taken in is dropped, as a kernel's abort drops it. */
  aborted: boolean;
}

/**
 * The service front end: the host side of the guest NIC. It owns the listening socket and the
 * client sockets, numbers connections and input events, and writes guest output back to the
 * clients. Input goes to `onInput` (the machine, or in COLO the primary and the mirror);
 * output arrives through `deliver()` (from the machine, or from the COLO compare).
 *
 * Flow control: a connection's socket stops being read while its input in flight to the guest
 * (what the guest has not consumed yet, as the vCPU's credits tell) exceeds
 * limits.nicConnectionInputWindowBytes, or while its client leaves more than
 * limits.nicClientOutputBufferedBytesMax of output unread; TCP then pushes back on the client.
 * Nothing is dropped, and other connections go on. Nothing pushes back on the guest's sends,
 * though: what the input already accepted produces is written whole, and a client that leaves
 * more than limits.nicClientOutputUnsentBytesMax of it unread is reset (resetUnread).
 *
 * Events: 'input' (NicInput) for every event produced, 'listening'.
 */
export class FrontEnd extends EventEmitter {
  private server: net.Server | null = null;
  private conns = new Map<number, ClientConn>();
  private nextConn: number;
  private nextSeq: number;
  /** Why client sockets are not read (a paused VM, the COLO compare's bound): read when none. */
  private readonly readingPausedFor = new Set<ReadingPause>();
  /**
   * Connections the guest knows (told 'open', or known from a restored state) and has not
   * closed yet; a client may be gone from `conns` while its guest connection lives on.
   */
  private readonly guestConns = new Set<number>();
  /**
   * Every socket accepted and not closed yet: those of `conns`, and those of connections the
   * guest closed that still send their last output or wait for the client's end (closeAfterGuest).
   * close() destroys them all: the server's close waits for every connection it accepted.
   */
  private readonly sockets = new Set<net.Socket>();
  /**
   * close() was called. The sockets it destroys still say so later ('close', and what they
   * had read): none of it is input any more. A front end started after this one (a failed
   * switchover's resume) numbers from the guest's state and resets every connection the guest
   * knows; late events numbered here would take those numbers first, and the NIC would drop
   * the new front end's events, a new client's open among them, as stale.
   */
  private closed = false;
  /**
   * The guest closed its listening socket (stopListening): nothing accepts any more, so the
   * address is not listened on (new clients are refused); connections go on.
   */
  private guestListenerClosed = false;

  constructor(
    readonly address: ListenAddress,
    private readonly onInput: (ev: NicInput) => void,
    start: { seq: number; conn: number } = { seq: 0, conn: 0 },
    /** Connections the guest may know at once; beyond it new clients are refused (a state holds at most limits.nicConnectionsMax). */
    private readonly connectionsMax: number = limits.nicConnectionsMax,
    /** How long the socket of a connection the guest closed may linger (limits.nicClosedConnectionLingerMs). */
    private readonly closedLingerMs: number = limits.nicClosedConnectionLingerMs,
  ) {
    super();
    this.nextSeq = start.seq + 1;
    this.nextConn = start.conn + 1;
  }

  /** Continue numbering above a restored guest's state. */
  renumberFrom(seq: number, conn: number): void {
    this.nextSeq = Math.max(this.nextSeq, seq + 1);
    this.nextConn = Math.max(this.nextConn, conn + 1);
  }

  get lastSeq(): number {
    return this.nextSeq - 1;
  }

  listen(): Promise<void> {
    if (this.guestListenerClosed) return Promise.resolve();
    return new Promise((resolve, reject) => {
      // Half-open: a client's FIN ends only its input (the guest reads EOF); the guest's output
      // still goes to it until the guest closes or shuts down its side (`printf ... | nc -N`).
      // Without it Node ended our side at the client's FIN and dropped the replies after it.
      const server = net.createServer({ noDelay: true, allowHalfOpen: true }, (s) => this.accept(s));
      server.maxConnections = limits.nicConnectionsMax;
      const onError = (err: Error): void => {
        server.close();
        reject(new UsageError('NET_LISTEN', `cannot listen on ${this.address.host}:${this.address.port}: ${err.message}`));
      };
      server.once('error', onError);
      server.listen({ host: this.address.host, port: this.address.port, exclusive: true }, () => {
        server.off('error', onError);
        if (this.guestListenerClosed) {
          // The guest closed its listener while this listened (a takeover's retry).
          server.close();
          resolve();
          return;
        }
        // Once listening, an error is a failed accept (a client's connection that broke before
        // it was taken, as Linux's accept reports it, or no memory for one): the server listens
        // on. Emitted as 'error' with nobody listening, it ended the process, the surviving VM's
        // too.
        server.on('error', (err) => log.info(`accepting a client on ${formatListen({ host: this.address.host, port: this.boundPort() })} failed: ${err.message}; listening on`));
        this.server = server;
        this.emit('listening');
        resolve();
      });
    });
  }

  /**
   * The guest closed its listening socket, and cannot open another (WASI preview1): stop
   * listening, so that a new client is refused (ECONNREFUSED) as a real server's is, instead
   * of waiting for an accept that never comes. Connections already accepted go on.
   */
  stopListening(): void {
    this.guestListenerClosed = true;
    const s = this.server;
    if (s === null) return;
    this.server = null;
    // The listening socket closes at once; the callback would wait for every connection.
    s.close();
    log.info(`the guest closed its listening socket: no longer listening on ${formatListen(this.address)}; ${this.conns.size} connection(s) go on`);
  }

  /** The guest closed its listening socket (stopListening): this front end does not listen. */
  get listenerClosed(): boolean {
    return this.guestListenerClosed;
  }

  /** The port actually bound (for port 0). */
  boundPort(): number {
    const a = this.server?.address();
    return a !== null && typeof a === 'object' ? a.port : this.address.port;
  }

  /**
   * Number an event and hand it on. Built as a literal with the fields in one order
   * ({seq, kind, conn[, bytes]}, as the input ring and the mirror decode them): an object
   * spread here (`{...ev, seq}`) made V8 create a new hidden class and descriptor array for
   * every client request, old-space garbage that cost collections and left every site that
   * read an event megamorphic.
   */
  private input(kind: 'open' | 'close', conn: number): void {
    this.emitInput({ seq: this.nextSeq++, kind, conn });
  }

  private inputData(conn: number, bytes: Uint8Array): void {
    this.emitInput({ seq: this.nextSeq++, kind: 'data', conn, bytes });
  }

  private emitInput(ev: NicInput): void {
    if (this.closed) return;
    this.onInput(ev);
    this.emit('input', ev);
  }

  private accept(socket: net.Socket): void {
    if (this.guestListenerClosed) {
      socket.destroy();
      return;
    }
    if (this.guestConns.size >= this.connectionsMax) {
      // Like a server out of file descriptors: the client is reset, the guest never hears of it.
      log.debug(`refused a client: the guest has ${this.guestConns.size} connections open`);
      socket.destroy();
      return;
    }
    const id = this.nextConn++;
    this.guestConns.add(id);
    const c: ClientConn = { id, socket, outOffset: 0, ended: false, eofSent: false, inFlight: 0, inputHeld: false, outputHeld: false, aborted: false };
    this.conns.set(id, c);
    this.sockets.add(socket);
    socket.setNoDelay(true);
    if (this.readingPausedFor.size > 0) socket.pause();
    this.input('open', id);
    const read = (data: Buffer): void => {
      // The guest closed the connection: nobody reads what the client still sends (nor is it
      // credited back, so it must not count against the window either).
      if (c.ended) return;
      latencyTrace?.requestRead(id);
      c.inFlight += data.byteLength + limits.nicInputEventCharge;
      if (!c.inputHeld && c.inFlight > limits.nicConnectionInputWindowBytes) {
        c.inputHeld = true;
        socket.pause();
      }
      // A view, not a copy: Node gives each read its own memory, and the input ring and the
      // mirror copy the bytes anyway.
      this.inputData(id, new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    };
    socket.on('data', read);
    socket.on('drain', () => {
      if (!c.outputHeld) return;
      c.outputHeld = false;
      this.resumeIfFree(c);
    });
    const eof = (): void => {
      if (c.eofSent || c.ended) return;
      c.eofSent = true;
      this.input('close', id);
    };
    // The client's FIN: the end of its input, not of the connection (allowHalfOpen).
    socket.on('end', eof);
    socket.on('error', () => {
      // A client that resets its connection is an ordinary event: the guest sees EOF.
    });
    socket.on('close', () => {
      // A client that sends and then resets while its socket is not read (a paused VM, a
      // checkpoint, a full window): what Node read before the reset is its input, as a
      // kernel's socket gives it before ECONNRESET; read while flowing, it was the guest's.
      if (!c.aborted) for (let data = socket.read() as Buffer | null; data !== null; data = socket.read() as Buffer | null) read(data);
      eof();
      this.sockets.delete(socket);
      if (this.conns.get(id) === c) this.conns.delete(id);
    });
  }

  /** Tell the guest that a connection it knows (from a restored state) is gone. */
  resetGuestConnection(conn: number): void {
    this.guestConns.add(conn);
    this.input('close', conn);
  }

  /** Write guest output to its client. Output for an unknown (gone) connection is dropped. */
  deliver(out: NicOutput): void {
    if (out.kind === 'close') this.guestConns.delete(out.conn);
    const c = this.conns.get(out.conn);
    if (c === undefined) return;
    switch (out.kind) {
      case 'out': {
        // Offsets make delivery idempotent: bytes already written are skipped.
        const end = out.offset + out.bytes.byteLength;
        if (end <= c.outOffset) return;
        const from = Math.max(0, c.outOffset - out.offset);
        if (out.offset > c.outOffset) return; // a gap: never write out of order
        c.socket.write(from === 0 ? out.bytes : out.bytes.subarray(from));
        latencyTrace?.replyWritten(out.conn);
        c.outOffset = end;
        if (c.socket.writableLength > limits.nicClientOutputUnsentBytesMax) {
          this.resetUnread(c);
          return;
        }
        if (!c.outputHeld && c.socket.writableLength > limits.nicClientOutputBufferedBytesMax) {
          c.outputHeld = true;
          c.socket.pause();
        }
        return;
      }
      case 'shut':
        c.socket.end();
        return;
      case 'close':
        this.conns.delete(out.conn);
        this.closeAfterGuest(c);
        return;
    }
  }

  /**
   * The client left more than limits.nicClientOutputUnsentBytesMax of output unread: reset it
   * (RST), as the host cannot make the guest wait. Its further output is dropped; the guest reads
   * EOF (the socket's 'close'), and the client keeps what it had received.
   */
  private resetUnread(c: ClientConn): void {
    log.info(`connection ${c.id}: the client left ${c.socket.writableLength} bytes of output unread, above ${limits.nicClientOutputUnsentBytesMax}; the connection is reset`);
    this.conns.delete(c.id);
    c.aborted = true;
    c.socket.resetAndDestroy();
  }

  /**
   * The guest closed the connection. Its unsent output still goes out, then our FIN. The socket
   * is read on (whatever the reasons to pause reading), and what it brings is dropped: only so
   * is the client's FIN or reset noticed. It is destroyed once the client ended its side too and
   * the output is out (the socket's own autoDestroy), or after closedLingerMs at most.
   */
  private closeAfterGuest(c: ClientConn): void {
    c.ended = true;
    const s = c.socket;
    s.end();
    s.resume();
    if (s.destroyed) return;
    const linger = setTimeout(() => {
      log.debug(`connection ${c.id}: the client neither took the last output nor closed within ${this.closedLingerMs} ms of the guest's close; reset`);
      s.destroy();
    }, this.closedLingerMs);
    s.once('close', () => clearTimeout(linger));
  }

  /**
   * Bytes of the guest's output on `conn` written to its client so far; null when there is no
   * client for it (never had one here, or it left or was reset: the guest may still hold it).
   */
  deliveredBytes(conn: number): number | null {
    return this.conns.get(conn)?.outOffset ?? null;
  }

  /** The guest consumed `bytes` of a connection's input (a vCPU credit): read on once half the window is free. */
  credit(conn: number, bytes: number): void {
    const c = this.conns.get(conn);
    if (c === undefined) return;
    c.inFlight = Math.max(0, c.inFlight - bytes);
    if (c.inputHeld && c.inFlight <= limits.nicConnectionInputWindowBytes / 2) {
      c.inputHeld = false;
      this.resumeIfFree(c);
    }
  }

  private resumeIfFree(c: ClientConn): void {
    if (this.readingPausedFor.size === 0 && !c.inputHeld && !c.outputHeld) c.socket.resume();
  }

  /**
   * Stop reading client sockets (a paused front end keeps its connections) for `why`; they are
   * read again once every reason was lifted by resumeReading.
   */
  pauseReading(why: ReadingPause = 'vm'): void {
    this.readingPausedFor.add(why);
    for (const c of this.conns.values()) c.socket.pause();
  }

  resumeReading(why: ReadingPause = 'vm'): void {
    if (!this.readingPausedFor.delete(why) || this.readingPausedFor.size > 0) return;
    for (const c of this.conns.values()) this.resumeIfFree(c);
  }

  connectionIds(): number[] {
    return [...this.conns.keys()];
  }

  /** Sockets accepted and not closed yet, lingering ones of connections the guest closed included. */
  openSockets(): number {
    return this.sockets.size;
  }

  /**
   * Stop serving; the address is free when this resolves. Every connection is reset, unless
   * `drainClosed` (a migration's switchover, after which this process lives on): then a
   * socket of a connection the guest already closed, which still owes its client output Node
   * holds, goes on sending it within its linger (else the switchover would cut off a reply
   * the guest sent and forgot); the others are reset (what the kernel holds still goes out,
   * then the FIN). At process exit nothing lingers, as QEMU's quit: a later close() without
   * `drainClosed` resets the sockets still draining.
   */
  async close(opts: { drainClosed?: boolean } = {}): Promise<void> {
    this.closed = true;
    const owing = new Set<net.Socket>();
    if (opts.drainClosed === true) {
      const live = new Set([...this.conns.values()].map((c) => c.socket));
      for (const sock of this.sockets) if (!live.has(sock) && !sock.destroyed && sock.writableLength > 0) owing.add(sock);
    }
    // The draining ones stay in `sockets` (their 'close' takes them out) for a later close().
    for (const sock of this.sockets) {
      if (owing.has(sock)) continue;
      sock.destroy();
      this.sockets.delete(sock);
    }
    this.conns.clear();
    const s = this.server;
    this.server = null;
    if (s === null) return;
    if (owing.size === 0) {
      await new Promise<void>((r) => s.close(() => r()));
      return;
    }
    // The listening socket closes at once; only the callback waits for the owing sockets.
    s.close();
  }
}
