/**
 * Socket addresses of the control plane, written the way QEMU writes them:
 * `unix:PATH`, `tcp:HOST:PORT`, `tcp:[V6ADDR]:PORT`, `tcp::PORT` (all interfaces / localhost).
 * QEMU's chardev suffixes `,server`, `,server=on`, `,nowait` and `,wait=off` are accepted and
 * ignored, so `-qmp unix:/run/vm.qmp,server,nowait` muscle memory works.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as nodePath from 'node:path';
import { ChannelClosedError, TimeoutError, UsageError, errorMessage } from '../core/errors.js';

export type SocketAddress =
  | { readonly kind: 'unix'; readonly path: string }
  | { readonly kind: 'tcp'; readonly host: string; readonly port: number };

/** Longest unix socket path Linux accepts (sun_path is 108 bytes with the terminating NUL). */
export const unixPathBytesMax = 107;

const ignoredOptions = new Set(['server', 'server=on', 'nowait', 'wait=off']);

function bad(text: string, why: string): UsageError {
  return new UsageError('BAD_ADDRESS', `bad address '${text}': ${why}`);
}

/** Parses `unix:PATH` or `tcp:HOST:PORT`; anything else is a UsageError with one clear line. */
export function parseAddress(text: string): SocketAddress {
  if (text.startsWith('unix:')) {
    const parts = text.slice('unix:'.length).split(',');
    while (parts.length > 1 && ignoredOptions.has(parts[parts.length - 1]!)) parts.pop();
    const path = parts.join(',');
    if (path === '') throw bad(text, 'the socket path is empty (expected unix:PATH)');
    if (path.includes('\0')) throw bad(text, 'the socket path contains a NUL byte');
    const bytes = Buffer.byteLength(path);
    if (bytes > unixPathBytesMax) {
      throw bad(text, `the socket path is ${bytes} bytes, longer than the ${unixPathBytesMax} a unix socket allows`);
    }
    return { kind: 'unix', path };
  }
  if (text.startsWith('tcp:')) {
    const [hostPort, ...options] = text.slice('tcp:'.length).split(',');
    for (const option of options) {
      if (!ignoredOptions.has(option)) throw bad(text, `option '${option}' is not supported`);
    }
    let host: string;
    let portText: string;
    const rest = hostPort!;
    if (rest.startsWith('[')) {
      const close = rest.indexOf(']');
      if (close < 0) throw bad(text, "missing ']' after the IPv6 address");
      host = rest.slice(1, close);
      if (host === '' || !net.isIPv6(host)) throw bad(text, `'${host}' is not an IPv6 address`);
      if (rest[close + 1] !== ':') throw bad(text, 'expected :PORT after the IPv6 address');
      portText = rest.slice(close + 2);
    } else {
      const colon = rest.lastIndexOf(':');
      if (colon < 0) throw bad(text, 'expected tcp:HOST:PORT');
      host = rest.slice(0, colon);
      portText = rest.slice(colon + 1);
      if (host.includes(':')) throw bad(text, 'an IPv6 host must be in brackets, as in tcp:[::1]:PORT');
    }
    if (!/^[0-9]{1,5}$/.test(portText) || Number(portText) > 65535) {
      throw bad(text, `port '${portText}' is not a number in 0..65535`);
    }
    return { kind: 'tcp', host, port: Number(portText) };
  }
  throw bad(text, 'expected unix:PATH or tcp:HOST:PORT');
}

/** The canonical text of an address, as used in every message about it. */
export function formatAddress(address: SocketAddress): string {
  if (address.kind === 'unix') return `unix:${address.path}`;
  const host = address.host.includes(':') ? `[${address.host}]` : address.host;
  return `tcp:${host}:${address.port}`;
}

export function toAddress(address: SocketAddress | string): SocketAddress {
  return typeof address === 'string' ? parseAddress(address) : address;
}

export interface Listener {
  readonly server: net.Server;
  /** The address actually bound (the real port when tcp port 0 was asked for). */
  readonly address: SocketAddress;
  /** Stops listening (existing connections are not touched) and removes the unix socket file. */
  close(): Promise<void>;
}

/**
 * Listens on `address`. A unix socket file left behind by a dead process is removed first; a
 * live one (something accepts connections on it) or a file that is not a socket is refused.
 * The socket file is unlinked when the server closes, if it is still ours.
 */
export async function listenOn(addressIn: SocketAddress | string, options: net.ServerOpts = {}): Promise<Listener> {
  const address = toAddress(addressIn);
  const text = formatAddress(address);
  if (address.kind === 'unix') await removeStaleSocket(address.path, text);

  const server = net.createServer(options);
  await new Promise<void>((resolve, reject) => {
    const onError = (err: Error): void => {
      reject(new UsageError('ADDRESS_UNAVAILABLE', `cannot listen on ${text}: ${address.kind === 'unix' ? unixListenFailure(address.path, err) : err.message}`));
    };
    server.once('error', onError);
    const done = (): void => {
      server.off('error', onError);
      resolve();
    };
    if (address.kind === 'unix') server.listen(address.path, done);
    else if (address.host === '') server.listen(address.port, done);
    else server.listen(address.port, address.host, done);
  });

  let bound: SocketAddress = address;
  if (address.kind === 'unix') {
    // Moved away or replaced between the bind and here (a proxy put in front of it, a
    // supervisor's relay): not a failure to listen, the socket is just no longer ours to remove.
    let ours: fs.Stats | null = null;
    try {
      ours = fs.statSync(address.path);
    } catch {
      // Nothing of ours at the path to remove at close.
    }
    if (ours !== null) {
      const mine = ours;
      server.once('close', () => {
        try {
          const now = fs.lstatSync(address.path);
          if (now.ino === mine.ino && now.dev === mine.dev) fs.unlinkSync(address.path);
        } catch {
          // Already gone (libuv unlinks it too): nothing to clean up.
        }
      });
    }
  } else {
    const info = server.address();
    if (info !== null && typeof info === 'object') bound = { kind: 'tcp', host: address.host, port: info.port };
  }

  let closing: Promise<void> | undefined;
  return {
    server,
    address: bound,
    close(): Promise<void> {
      // The callback also runs (with an error) when the server was already closed.
      closing ??= new Promise<void>((resolve) => server.close(() => resolve()));
      return closing;
    },
  };
}

/**
 * Why a unix socket could not be bound. libuv reports a missing directory as EACCES
 * ("permission denied", nodejs/node#35538): say that the directory is not there instead.
 */
function unixListenFailure(path: string, err: Error): string {
  if ((err as NodeJS.ErrnoException).code === 'EACCES') {
    const dir = nodePath.dirname(path);
    if (!fs.existsSync(dir)) return `the directory ${dir} does not exist`;
  }
  return err.message;
}

async function removeStaleSocket(path: string, text: string): Promise<void> {
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(path);
  } catch {
    return; // nothing there
  }
  if (!stat.isSocket()) {
    throw new UsageError('ADDRESS_UNAVAILABLE', `cannot listen on ${text}: the path exists and is not a socket`);
  }
  let live = false;
  try {
    const probe = await connectTo({ kind: 'unix', path }, 1000);
    probe.destroy();
    live = true;
  } catch (err) {
    // Only ECONNREFUSED says nobody is bound to it (ENOENT: it went meanwhile). Anything else
    // (EAGAIN: a full accept queue, a timeout) is a process that is there but does not accept,
    // one that hangs: unlinking its socket would take its address from it.
    const code = ((err as Error).cause as NodeJS.ErrnoException | undefined)?.code;
    if (code !== 'ECONNREFUSED' && code !== 'ENOENT') {
      throw new UsageError('ADDRESS_UNAVAILABLE', `cannot listen on ${text}: a process is bound to it and does not accept connections (${errorMessage(err)})`);
    }
  }
  if (live) throw new UsageError('ADDRESS_UNAVAILABLE', `cannot listen on ${text}: another process is listening on it`);
  try {
    fs.unlinkSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new UsageError('ADDRESS_UNAVAILABLE', `cannot remove the stale socket ${text}: ${errorMessage(err)}`);
    }
  }
}

/**
 * Connects to `address`; rejects with TimeoutError after `timeoutMs`, or with
 * ChannelClosedError when the peer refuses or is not there (the cause holds the system error).
 * Messages name the other end `peer` (default: the address). `signal` gives the connect up at
 * once (ChannelClosedError): a connect still pending (a peer that drops SYNs, or whose accept
 * queue is full) holds the socket and the timer, and with them the process, until the timeout.
 */
export function connectTo(addressIn: SocketAddress | string, timeoutMs: number, peer?: string, signal?: AbortSignal): Promise<net.Socket> {
  const address = toAddress(addressIn);
  const text = peer ?? formatAddress(address);
  if (signal?.aborted === true) return Promise.reject(new ChannelClosedError(`connecting to ${text} was given up`));
  return new Promise<net.Socket>((resolve, reject) => {
    const socket =
      address.kind === 'unix'
        ? net.connect({ path: address.path })
        : net.connect({ host: address.host === '' ? 'localhost' : address.host, port: address.port });
    const settle = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    };
    const timer = setTimeout(() => {
      settle();
      socket.destroy();
      reject(new TimeoutError(`timed out after ${timeoutMs} ms connecting to ${text}`));
    }, timeoutMs);
    const onAbort = (): void => {
      settle();
      socket.off('error', onError);
      socket.destroy();
      reject(new ChannelClosedError(`connecting to ${text} was given up`));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    socket.once('connect', () => {
      settle();
      if (address.kind === 'tcp') socket.setNoDelay(true);
      socket.off('error', onError);
      resolve(socket);
    });
    const onError = (err: Error): void => {
      settle();
      socket.destroy();
      reject(new ChannelClosedError(`cannot connect to ${text}: ${err.message}`, { cause: err }));
    };
    socket.once('error', onError);
  });
}
