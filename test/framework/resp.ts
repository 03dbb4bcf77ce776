/** A minimal Redis-protocol client for tests: one connection, commands in order. */
import net from 'node:net';

export type RespValue = string | number | null | RespValue[] | Error;

export class RespClient {
  private buf = Buffer.alloc(0);
  private waiting: { resolve: (v: RespValue) => void; reject: (e: Error) => void }[] = [];
  private closedError: Error | null = null;

  private constructor(private readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      for (;;) {
        const r = parse(this.buf, 0);
        if (r === null) break;
        this.buf = this.buf.subarray(r.end);
        this.waiting.shift()?.resolve(r.value);
      }
    });
    const fail = (e: Error): void => {
      this.closedError = e;
      for (const w of this.waiting.splice(0)) w.reject(e);
    };
    socket.on('error', fail);
    socket.on('close', () => fail(new Error('connection closed')));
  }

  static connect(port: number, host = '127.0.0.1', timeoutMs = 5000): Promise<RespClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ port, host });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new Error(`timed out after ${timeoutMs} ms connecting to ${host}:${port}`));
      }, timeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        s.setNoDelay(true);
        resolve(new RespClient(s));
      });
      s.once('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
    });
  }

  /**
   * Connect once something serves on `port` (a restored or taken-over VM opens its address
   * a moment after it is ready); fails after `timeoutMs` naming `what`.
   */
  static async whenServing(port: number, what: string, timeoutMs = 10000): Promise<RespClient> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        return await RespClient.connect(port);
      } catch {
        if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} on port ${port}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }

  command(args: (string | number)[], timeoutMs = 5000): Promise<RespValue> {
    if (this.closedError !== null) return Promise.reject(this.closedError);
    const parts = args.map(String);
    const wire = `*${parts.length}\r\n` + parts.map((p) => `$${Buffer.byteLength(p)}\r\n${p}\r\n`).join('');
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for the reply to ${parts[0]}`)), timeoutMs);
      this.waiting.push({
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      this.socket.write(wire);
    });
  }

  close(): void {
    this.socket.destroy();
  }

  /** Leave with a reset (RST), as a client that crashed or timed out does. */
  reset(): void {
    this.socket.resetAndDestroy();
  }
}

function parse(b: Buffer, at: number): { value: RespValue; end: number } | null {
  const nl = b.indexOf('\r\n', at);
  if (nl < 0) return null;
  const line = b.toString('latin1', at + 1, nl);
  const next = nl + 2;
  switch (String.fromCharCode(b[at]!)) {
    case '+':
      return { value: line, end: next };
    case '-':
      return { value: new Error(line), end: next };
    case ':':
      return { value: Number(line), end: next };
    case '$': {
      const n = Number(line);
      if (n < 0) return { value: null, end: next };
      if (b.byteLength < next + n + 2) return null;
      return { value: b.toString('utf8', next, next + n), end: next + n + 2 };
    }
    case '*': {
      const n = Number(line);
      if (n < 0) return { value: null, end: next };
      const items: RespValue[] = [];
      let p = next;
      for (let i = 0; i < n; i++) {
        const r = parse(b, p);
        if (r === null) return null;
        items.push(r.value);
        p = r.end;
      }
      return { value: items, end: p };
    }
    default:
      throw new Error(`bad RESP reply byte ${b[at]}`);
  }
}

/**
 * A client that sends one command after the other until stop() or until its connection goes
 * away (a switchover or a failover resets it). `step` runs one command: it returns false when
 * the connection failed (the loop ends quietly) and throws when the answer is wrong (the loop
 * ends with that error, seen by ended() and stop()).
 */
abstract class ClientLoop {
  private stopped = false;
  private loop: Promise<void> = Promise.resolve();

  protected constructor(protected readonly client: RespClient) {}

  protected begin(step: (i: number) => Promise<boolean>): void {
    this.loop = (async () => {
      for (let i = 0; !this.stopped; i++) if (!(await step(i))) return;
    })();
  }

  /** Resolves when the loop ended by itself (its connection closed). */
  ended(): Promise<void> {
    return this.loop;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.client.close();
    await this.loop;
  }
}

/** SETs unique keys and records the ones acknowledged with OK. */
export class AckedWriter extends ClientLoop {
  readonly acked = new Map<string, string>();
  /** Why the loop ended by itself (the command's error), for a test's failure message. */
  endedBy: string | null = null;
  /** The last answer other than OK. */
  refused: string | null = null;

  private constructor(client: RespClient, prefix: string, valueOf: (i: number) => string, paceMs: number) {
    super(client);
    this.begin(async (i) => {
      const key = `${prefix}${i}`;
      const value = valueOf(i);
      if (paceMs > 0 && i > 0) await new Promise((r) => setTimeout(r, paceMs));
      try {
        const r = await client.command(['SET', key, value]);
        if (r === 'OK') this.acked.set(key, value);
        else this.refused = `SET ${key}: ${JSON.stringify(r)}`;
        return true;
      } catch (err) {
        this.endedBy = `SET ${key}: ${(err as Error).message}`;
        return false;
      }
    });
  }

  /** `paceMs`: a pause before each SET after the first (a test whose guest's disk must not fill). */
  static async start(port: number, prefix: string, valueOf: (i: number) => string = (i) => `value-${i}`, paceMs = 0): Promise<AckedWriter> {
    return new AckedWriter(await RespClient.connect(port), prefix, valueOf, paceMs);
  }
}

/** INCRs one counter; remembers the highest value acknowledged and fails if one goes backwards. */
export class Incrementer extends ClientLoop {
  last = 0;

  private constructor(client: RespClient, key: string) {
    super(client);
    this.begin(async () => {
      let v: unknown;
      try {
        v = await client.command(['INCR', key]);
      } catch {
        return false;
      }
      if (typeof v !== 'number') throw new Error(`INCR ${key} answered ${String(v)}`);
      if (v <= this.last) throw new Error(`INCR ${key} went backwards: ${v} after ${this.last}`);
      this.last = v;
      return true;
    });
  }

  static async start(port: number, key: string): Promise<Incrementer> {
    return new Incrementer(await RespClient.connect(port), key);
  }
}

/** How many of `expected` do not read back with their value on `client`. */
export async function countMissing(client: RespClient, expected: ReadonlyMap<string, string>): Promise<number> {
  let missing = 0;
  for (const [k, v] of expected) if ((await client.command(['GET', k])) !== v) missing++;
  return missing;
}
