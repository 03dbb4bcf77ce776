/**
 * A client that floods a kv guest with pipelined INCRs of one key (or another command) and
 * reads none of the replies until told to: what flow control in the front end must push back on.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { waitFor, type TestEnv } from './harness.js';

const mib = 1024 * 1024;
const incr = Buffer.from('*2\r\n$4\r\nINCR\r\n$5\r\nflood\r\n');

/** The command a flood repeats, and the reply to its i-th copy (from 1). */
export interface FloodCommand {
  bytes: Buffer;
  reply: (i: number) => string;
}

/** SET of one key to a value of `valueBytes` bytes: much input, a short reply. */
export function setCommand(key: string, valueBytes: number): FloodCommand {
  const value = 'v'.repeat(valueBytes);
  return { bytes: Buffer.from(`*3\r\n$3\r\nSET\r\n$${key.length}\r\n${key}\r\n$${valueBytes}\r\n${value}\r\n`), reply: () => '+OK' };
}

export function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  assert.ok(m !== null, `no VmRSS for process ${pid}`);
  return Number(m[1]) * 1024;
}

export class IncrFlood {
  written = 0;
  private writing = true;

  private constructor(private readonly socket: net.Socket, readonly target: number, private readonly cmd: FloodCommand) {}

  /**
   * Connect and write INCRs (or `command`; in chunks of whole commands of about 64 KiB) as
   * fast as the socket takes them, up to `targetBytes`; resolves once the writes stall for a
   * whole second.
   */
  static async start(env: TestEnv, port: number, targetBytes = 256 * mib, command: FloodCommand = { bytes: incr, reply: (i) => `:${i}` }): Promise<IncrFlood> {
    const socket = net.connect({ port, host: '127.0.0.1' });
    env.onCleanup(() => {
      socket.destroy();
    });
    socket.pause();
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const f = new IncrFlood(socket, targetBytes, command);
    const cmd = command.bytes;
    const chunk = Buffer.concat(Array<Buffer>(Math.max(1, Math.floor(65536 / cmd.byteLength))).fill(cmd));
    const pump = (): void => {
      while (f.writing && f.written < targetBytes) {
        f.written += chunk.byteLength;
        if (!socket.write(chunk)) {
          socket.once('drain', pump);
          return;
        }
      }
    };
    pump();
    let last = -1;
    let stillSince = performance.now();
    await waitFor('the flooding client to be pushed back (its writes stall for 1 s)', () => {
      if (f.written !== last) {
        last = f.written;
        stillSince = performance.now();
        return false;
      }
      return performance.now() - stillSince >= 1000;
    }, 30000, 50);
    f.writing = false;
    return f;
  }

  get commands(): number {
    return this.written / this.cmd.bytes.byteLength;
  }

  /** Read the replies: every command written is answered, in order (INCR: 1, 2, ... n). */
  async readAllReplies(timeoutMs = 120000): Promise<void> {
    let expect = 1;
    let pending: Buffer = Buffer.alloc(0);
    let bad: string | null = null;
    this.socket.on('data', (d: Buffer) => {
      pending = pending.length === 0 ? d : Buffer.concat([pending, d]);
      let at = 0;
      for (;;) {
        const nl = pending.indexOf(10, at);
        if (nl < 0) break;
        const line = pending.toString('latin1', at, nl - 1);
        if (bad === null && line !== this.cmd.reply(expect)) bad = `reply ${expect} was '${line}'`;
        expect++;
        at = nl + 1;
      }
      pending = pending.subarray(at);
    });
    this.socket.resume();
    await waitFor(`all ${this.commands} flood replies`, () => bad !== null || expect - 1 >= this.commands, timeoutMs, 50);
    assert.equal(bad, null);
    assert.equal(expect - 1, this.commands, 'one reply per command');
  }
}
