/** Shared test helpers for the control plane: temp dirs, a raw line client, a started server. */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import type { TestContext } from 'node:test';
import { QmpServer, type QmpServerOptions } from '../../src/control/qmp-server.js';
import { withTimeout } from '../framework/harness.js';

export const waitMs = 3000;

/** A fresh temp dir removed after the test. */
export function tempDir(t: TestContext): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-qmp-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Resolves with `promise`, or rejects if it takes longer than `ms` (the harness's withTimeout). */
export const within = withTimeout;

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A deferred promise, for handlers a test releases when it wants. */
export function deferred<T = void>(): { promise: Promise<T>; resolve(value: T): void; reject(err: Error): void } {
  let resolve!: (value: T) => void;
  let reject!: (err: Error) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** A raw socket client that records every byte and hands out CRLF-terminated lines. */
export class LineClient {
  raw = '';
  private buffered = '';
  private readonly lines: string[] = [];
  private waiter: (() => void) | undefined;
  private endedFlag = false;
  readonly closed: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => {
      this.raw += text;
      this.buffered += text;
      for (;;) {
        const nl = this.buffered.indexOf('\n');
        if (nl < 0) break;
        this.lines.push(this.buffered.slice(0, nl + 1));
        this.buffered = this.buffered.slice(nl + 1);
      }
      this.waiter?.();
    });
    socket.on('error', () => {});
    this.closed = new Promise((resolve) =>
      socket.once('close', () => {
        this.endedFlag = true;
        this.waiter?.();
        resolve();
      }),
    );
  }

  static connect(socketPath: string): Promise<LineClient> {
    return within(
      new Promise<LineClient>((resolve, reject) => {
        const socket = net.connect(socketPath);
        socket.once('connect', () => resolve(new LineClient(socket)));
        socket.once('error', reject);
      }),
      waitMs,
      `connect ${socketPath}`,
    );
  }

  /** The next line exactly as received, "\r\n" included. */
  async rawLine(ms = waitMs): Promise<string> {
    const deadline = Date.now() + ms;
    while (this.lines.length === 0) {
      if (this.endedFlag) throw new Error(`connection closed while waiting for a line (unterminated: ${JSON.stringify(this.buffered)})`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no line within ${ms} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.waiter = undefined;
    }
    return this.lines.shift()!;
  }

  /** The next line parsed; asserts it ends in CRLF. */
  async next(ms = waitMs): Promise<Record<string, unknown>> {
    const line = await this.rawLine(ms);
    if (!line.endsWith('\r\n')) throw new Error(`line not CRLF-terminated: ${JSON.stringify(line)}`);
    return JSON.parse(line) as Record<string, unknown>;
  }

  /** True if no complete line arrives within `ms`. */
  async silent(ms: number): Promise<boolean> {
    await sleep(ms);
    return this.lines.length === 0;
  }

  send(text: string): void {
    this.socket.write(text);
  }

  sendJson(message: unknown): void {
    this.socket.write(JSON.stringify(message) + '\n');
  }

  /** Sends a command and returns the next line parsed. */
  async call(message: unknown): Promise<Record<string, unknown>> {
    this.sendJson(message);
    return this.next();
  }

  /** Reads the greeting and negotiates (with oob unless told otherwise). */
  async negotiate(oob = true): Promise<void> {
    await this.next();
    const reply = await this.call(oob ? { execute: 'qmp_capabilities', arguments: { enable: ['oob'] } } : { execute: 'qmp_capabilities' });
    if (JSON.stringify(reply) !== '{"return":{}}') throw new Error(`negotiation failed: ${JSON.stringify(reply)}`);
  }

  get ended(): boolean {
    return this.endedFlag;
  }

  async close(): Promise<void> {
    this.socket.destroy();
    await within(this.closed, waitMs, 'raw client close');
  }
}

/** A QmpServer listening on a unix socket in a temp dir; closed after the test. */
export async function startServer(
  t: TestContext,
  options: QmpServerOptions = {},
  setup: (server: QmpServer) => void = () => {},
): Promise<{ server: QmpServer; socketPath: string; address: string }> {
  const dir = tempDir(t);
  const socketPath = path.join(dir, 'vm.qmp');
  const server = new QmpServer({ version: '0.1.0', ...options });
  setup(server);
  await server.listen(`unix:${socketPath}`);
  t.after(() => within(server.close(), waitMs, 'server close'));
  return { server, socketPath, address: `unix:${socketPath}` };
}

/** A LineClient closed after the test. */
export async function rawClient(t: TestContext, socketPath: string): Promise<LineClient> {
  const client = await LineClient.connect(socketPath);
  t.after(() => client.close());
  return client;
}
