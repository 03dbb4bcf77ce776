/**
 * A TCP proxy in front of a COLO secondary that takes every connection of the pair through it
 * (the main channel, each multifd channel, the SVM output channel) and lets a test break ONE of
 * them at a moment of its choosing while the others live: reset it, stall it (stop forwarding
 * both ways, the connection kept open), or flip one byte of what comes next.
 *
 *   const proxy = await ChannelProxy.start(migPort);
 *   migrate uri=tcp:127.0.0.1:${proxy.port}
 *   await proxy.established('multifd1'); proxy.reset('multifd1');
 *
 * It rewrites the destination's `ready` reply (multifd ports) and the secondary's
 * CHECKPOINT_READY (output channel port) so that those connections come here too.
 */
import net from 'node:net';
import { encodeFrame, FrameType, frameHeaderBytes, preambleBytes } from '../../src/migration/stream.js';
import { waitFor } from './harness.js';

/** 'main', 'multifd0' … 'multifdN', 'output'. */
export type LinkName = string;

interface Link {
  client: net.Socket;
  upstream: net.Socket;
  stalled: boolean;
  /** Stalled one way only (down: source → destination; up: back), or null for both ways. */
  stalledDir: 'down' | 'up' | null;
  /** Flip a byte of the next chunk in this direction. */
  corrupt: 'down' | 'up' | null;
  /** Directions held for a while (hold): not read until released. */
  held: Set<'down' | 'up'>;
  /** Bytes forwarded source → destination (down) and back (up). */
  down: number;
  up: number;
}

export class ChannelProxy {
  private readonly servers: net.Server[] = [];
  private readonly sockets = new Set<net.Socket>();
  private readonly links = new Map<LinkName, Link>();
  port = 0;

  static async start(targetPort: number): Promise<ChannelProxy> {
    const p = new ChannelProxy();
    p.port = await p.listen(targetPort, 'main');
    return p;
  }

  /** Resolves once the link is connected through the proxy. */
  async established(name: LinkName, timeoutMs = 30000): Promise<void> {
    await waitFor(`the ${name} connection through the proxy`, () => this.links.has(name), timeoutMs);
  }

  names(): LinkName[] {
    return [...this.links.keys()];
  }

  bytes(name: LinkName): { down: number; up: number } {
    const l = this.link(name);
    return { down: l.down, up: l.up };
  }

  private link(name: LinkName): Link {
    const l = this.links.get(name);
    if (l === undefined) throw new Error(`no ${name} connection through the proxy (have ${this.names().join(', ')})`);
    return l;
  }

  /** Reset both halves of the connection (RST to each end). */
  reset(name: LinkName): void {
    const l = this.link(name);
    l.client.resetAndDestroy();
    l.upstream.resetAndDestroy();
  }

  /**
   * Stop forwarding either way (or only `dir`: down, source → destination; up, back), a close
   * included; the connection stays open (a silent path).
   */
  stall(name: LinkName, dir?: 'down' | 'up'): void {
    const l = this.link(name);
    l.stalled = true;
    l.stalledDir = dir ?? null;
    if (dir !== 'up') l.client.pause();
    if (dir !== 'down') l.upstream.pause();
  }

  /**
   * Stop forwarding `dir` (down: source → destination; up: back) for a while, losing nothing:
   * what comes waits (TCP's window closes) until the returned function is called (a slow path).
   */
  hold(name: LinkName, dir: 'down' | 'up'): () => void {
    const l = this.link(name);
    const [from, to] = dir === 'down' ? [l.client, l.upstream] : [l.upstream, l.client];
    l.held.add(dir);
    from.pause();
    return () => {
      l.held.delete(dir);
      if (!this.stalledOn(l, dir) && !to.writableNeedDrain) from.resume();
    };
  }

  private stalledOn(link: Link, dir: 'down' | 'up'): boolean {
    return link.stalled && (link.stalledDir === null || link.stalledDir === dir);
  }

  /** Flip one byte of the next chunk going down (source → destination) or up. */
  corrupt(name: LinkName, dir: 'down' | 'up' = 'down'): void {
    this.link(name).corrupt = dir;
  }

  private track(s: net.Socket): net.Socket {
    this.sockets.add(s);
    s.on('error', () => undefined);
    s.once('close', () => this.sockets.delete(s));
    return s;
  }

  private async listen(targetPort: number, name: LinkName): Promise<number> {
    const server = net.createServer((client) => {
      this.track(client);
      client.setNoDelay(true);
      const upstream = this.track(net.connect({ host: '127.0.0.1', port: targetPort }));
      upstream.setNoDelay(true);
      const link: Link = { client, upstream, stalled: false, stalledDir: null, corrupt: null, held: new Set(), down: 0, up: 0 };
      // The first connection of a name is the pair's (a later one is a retry: also tracked).
      this.links.set(name, link);
      this.pipe(link, client, upstream, 'down');
      if (name === 'main') this.rewriteReplies(link, upstream, client);
      else this.pipe(link, upstream, client, 'up');
    });
    this.servers.push(server);
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    const a = server.address();
    return typeof a === 'object' && a !== null ? a.port : 0;
  }

  private pipe(link: Link, from: net.Socket, to: net.Socket, dir: 'down' | 'up'): void {
    from.on('data', (chunk: Buffer) => {
      if (this.stalledOn(link, dir)) return;
      // As a network path: what the receiver does not take holds the sender back (TCP's window),
      // instead of piling up here.
      if (!to.write(this.maybeCorrupt(link, dir, chunk))) {
        from.pause();
        to.once('drain', () => {
          if (!this.stalledOn(link, dir) && !link.held.has(dir)) from.resume();
        });
      }
    });
    // A silent path forwards no FIN or reset either: the other end never learns of a close.
    from.on('end', () => this.stalledOn(link, dir) || to.end());
    from.on('close', () => this.stalledOn(link, dir) || to.destroy());
  }

  private maybeCorrupt(link: Link, dir: 'down' | 'up', chunk: Buffer): Buffer {
    if (dir === 'down') link.down += chunk.byteLength;
    else link.up += chunk.byteLength;
    if (link.corrupt !== dir || chunk.byteLength === 0) return chunk;
    link.corrupt = null;
    const c = Buffer.from(chunk);
    const at = Math.floor(c.byteLength / 2);
    c[at] = c[at]! ^ 0x40;
    return c;
  }

  /** destination → source on the main channel: frames through, ports of `ready` and CHECKPOINT_READY proxied. */
  private rewriteReplies(link: Link, from: net.Socket, to: net.Socket): void {
    let buf = Buffer.alloc(0);
    let prefixLeft = preambleBytes;
    let chain = Promise.resolve();
    from.on('data', (chunk: Buffer) => {
      if (this.stalledOn(link, 'up')) return;
      link.up += chunk.byteLength;
      buf = Buffer.concat([buf, chunk]);
      const out: Buffer[] = [];
      if (prefixLeft > 0) {
        const n = Math.min(prefixLeft, buf.byteLength);
        out.push(buf.subarray(0, n));
        buf = buf.subarray(n);
        prefixLeft -= n;
      }
      while (prefixLeft === 0 && buf.byteLength >= frameHeaderBytes) {
        const total = frameHeaderBytes + buf.readUInt32BE(8);
        if (buf.byteLength < total) break;
        out.push(buf.subarray(0, total));
        buf = buf.subarray(total);
      }
      chain = chain.then(async () => {
        for (const u of out) to.write(await this.rewrite(u));
      });
    });
    from.on('end', () => void chain.then(() => this.stalledOn(link, 'up') || to.end()));
    from.on('close', () => void chain.then(() => this.stalledOn(link, 'up') || to.destroy()));
  }

  private async rewrite(u: Buffer): Promise<Buffer> {
    if (u.byteLength <= frameHeaderBytes) return u;
    const type = u.readUInt8(0);
    if (type !== FrameType.reply && type !== FrameType.colo) return u;
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(u.subarray(frameHeaderBytes).toString('utf8')) as Record<string, unknown>;
    } catch {
      return u;
    }
    if (type === FrameType.reply && msg.kind === 'ready' && Array.isArray(msg.channelPorts) && msg.channelPorts.length > 0) {
      const proxied: number[] = [];
      for (const [i, p] of (msg.channelPorts as number[]).entries()) proxied.push(await this.listen(p, `multifd${i}`));
      msg.channelPorts = proxied;
    } else if (type === FrameType.colo && msg.msg === 'CHECKPOINT_READY' && typeof msg.outputPort === 'number') {
      msg.outputPort = await this.listen(msg.outputPort, 'output');
    } else return u;
    return Buffer.concat(encodeFrame(type, u.readUInt32BE(4), [Buffer.from(JSON.stringify(msg))], u.readUInt8(1)));
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await Promise.all(this.servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
  }
}
