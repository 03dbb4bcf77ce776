/**
 * A fault-injecting TCP proxy for the migration stream. It sits between source and
 * destination on the main channel and understands just enough of the format to put faults
 * where they hurt: it knows frame boundaries (preamble + 16-byte headers), and it rewrites the
 * destination's `ready` reply so that the multifd channels also go through it (each channel
 * gets its own proxied port; the frame is re-encoded with a valid checksum).
 *
 *   const proxy = await FaultProxy.start(destPort, { channel: 'main', fault: { kind: 'corrupt', atByte: 1 << 20 } });
 *   migrate uri=tcp:127.0.0.1:${proxy.port}
 */
import net from 'node:net';
import { encodeFrame, FrameType, frameHeaderBytes, preambleBytes } from '../../src/migration/stream.js';
import { channelHelloBytes, packetHeaderBytes } from '../../src/migration/multifd-format.js';

export type Fault =
  /** Flip one byte at this offset of the source → destination stream. */
  | { kind: 'corrupt'; atByte: number }
  /** Forward this many bytes, then cut both connections. */
  | { kind: 'truncate'; atByte: number }
  /** Swap unit `index` and unit `index + 1` (frames on the main channel, packets on multifd). */
  | { kind: 'reorder'; index: number };

export interface ProxyOptions {
  /** Which stream gets the fault: the main channel or multifd channel 0. */
  channel: 'main' | 'multifd';
  fault: Fault;
}

/** Splits a byte stream into units (frames or packets) after a fixed-size prefix. */
class Framer {
  private buf = Buffer.alloc(0);
  private prefixLeft: number;
  constructor(prefix: number, private readonly headerBytes: number, private readonly lengthOf: (h: Buffer) => number) {
    this.prefixLeft = prefix;
  }
  /** Push bytes; returns prefix bytes (passed through as they come) and complete units. */
  push(chunk: Buffer): { prefix: Buffer | null; units: Buffer[] } {
    this.buf = Buffer.concat([this.buf, chunk]);
    let prefix: Buffer | null = null;
    const units: Buffer[] = [];
    if (this.prefixLeft > 0) {
      const n = Math.min(this.prefixLeft, this.buf.byteLength);
      prefix = this.buf.subarray(0, n);
      this.buf = this.buf.subarray(n);
      this.prefixLeft -= n;
      if (this.prefixLeft > 0) return { prefix, units };
    }
    for (;;) {
      if (this.buf.byteLength < this.headerBytes) return { prefix, units };
      const total = this.headerBytes + this.lengthOf(this.buf.subarray(0, this.headerBytes));
      if (this.buf.byteLength < total) return { prefix, units };
      units.push(this.buf.subarray(0, total));
      this.buf = this.buf.subarray(total);
    }
  }
}

function faultyPipe(from: net.Socket, to: net.Socket, fault: Fault | null, framer: () => Framer, onCut: () => void): void {
  let offset = 0;
  let unit = 0;
  let held: Buffer | null = null;
  const f = fault?.kind === 'reorder' ? framer() : null;
  from.on('data', (chunk: Buffer) => {
    if (fault === null) {
      to.write(chunk);
      return;
    }
    if (fault.kind === 'corrupt') {
      if (fault.atByte >= offset && fault.atByte < offset + chunk.byteLength) {
        chunk = Buffer.from(chunk);
        chunk[fault.atByte - offset] = chunk[fault.atByte - offset]! ^ 0x40;
      }
      offset += chunk.byteLength;
      to.write(chunk);
      return;
    }
    if (fault.kind === 'truncate') {
      const keep = Math.max(0, Math.min(chunk.byteLength, fault.atByte - offset));
      offset += chunk.byteLength;
      if (keep > 0) to.write(chunk.subarray(0, keep));
      if (offset >= fault.atByte) {
        to.end(() => onCut());
        from.destroy();
      }
      return;
    }
    const { prefix, units } = f!.push(chunk);
    if (prefix !== null) to.write(prefix);
    for (const u of units) {
      if (unit === fault.index) {
        held = u;
      } else if (held !== null) {
        to.write(u);
        to.write(held);
        held = null;
      } else {
        to.write(u);
      }
      unit++;
    }
  });
  from.on('end', () => to.end());
  from.on('error', () => to.destroy());
  from.on('close', () => to.destroy());
}

function mainFramer(): Framer {
  return new Framer(preambleBytes, frameHeaderBytes, (h) => h.readUInt32BE(8));
}

function multifdFramer(): Framer {
  return new Framer(channelHelloBytes, packetHeaderBytes, (h) => h.readUInt32LE(28));
}

export class FaultProxy {
  private readonly servers: net.Server[] = [];
  private readonly sockets = new Set<net.Socket>();
  port = 0;
  /** Set once the fault's connection was cut (truncate). */
  cut = false;

  private constructor(private readonly opts: ProxyOptions) {}

  static async start(targetPort: number, opts: ProxyOptions): Promise<FaultProxy> {
    const p = new FaultProxy(opts);
    p.port = await p.listen(targetPort, 'main');
    return p;
  }

  private track(s: net.Socket): net.Socket {
    this.sockets.add(s);
    s.on('error', () => undefined);
    s.once('close', () => this.sockets.delete(s));
    return s;
  }

  private async listen(targetPort: number, role: 'main' | 'multifd'): Promise<number> {
    const server = net.createServer((client) => {
      this.track(client);
      client.setNoDelay(true);
      const upstream = this.track(net.connect({ host: '127.0.0.1', port: targetPort }));
      upstream.setNoDelay(true);
      const faulted = this.opts.channel === role && (role === 'main' || targetPort === this.firstChannelPort);
      const fault = faulted ? this.opts.fault : null;
      faultyPipe(client, upstream, fault, role === 'main' ? mainFramer : multifdFramer, () => {
        this.cut = true;
        client.destroy();
      });
      if (role === 'main') this.rewriteReplies(upstream, client);
      else {
        upstream.on('data', (d: Buffer) => client.write(d));
        upstream.on('end', () => client.end());
        upstream.on('close', () => client.destroy());
      }
    });
    this.servers.push(server);
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    const a = server.address();
    return typeof a === 'object' && a !== null ? a.port : 0;
  }

  private firstChannelPort = -1;

  /** destination → source: pass frames through, proxying the multifd ports of `ready`. */
  private rewriteReplies(from: net.Socket, to: net.Socket): void {
    const framer = mainFramer();
    let chain = Promise.resolve();
    from.on('data', (chunk: Buffer) => {
      const { prefix, units } = framer.push(chunk);
      chain = chain.then(async () => {
        if (prefix !== null) to.write(prefix);
        for (const u of units) {
          if (u.byteLength >= frameHeaderBytes && u.readUInt8(0) === FrameType.reply && u.byteLength > frameHeaderBytes) {
            const msg = JSON.parse(u.subarray(frameHeaderBytes).toString('utf8')) as Record<string, unknown>;
            if (msg.kind === 'ready' && Array.isArray(msg.channelPorts) && msg.channelPorts.length > 0) {
              const real = msg.channelPorts as number[];
              this.firstChannelPort = real[0]!;
              const proxied: number[] = [];
              for (const p of real) proxied.push(await this.listen(p, 'multifd'));
              msg.channelPorts = proxied;
              to.write(Buffer.concat(encodeFrame(FrameType.reply, u.readUInt32BE(4), [Buffer.from(JSON.stringify(msg))])));
              continue;
            }
          }
          to.write(u);
        }
      });
    });
    from.on('end', () => void chain.then(() => to.end()));
    from.on('close', () => void chain.then(() => to.destroy()));
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await Promise.all(this.servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
  }
}
