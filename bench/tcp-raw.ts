/**
 * The baseline of the migration benchmark: raw loopback TCP throughput with N sockets, the
 * best this Node.js can do, measured the way multifd runs — two processes, one worker thread
 * per socket on each side, the receivers listening and the senders connecting. The sender
 * writes 1 MiB buffers; the receiver reads into a reused 1 MiB buffer (Node's `onread` on the
 * accepted handle, as the multifd receivers do) and throws the bytes away. The time is from
 * the first byte received to the last, over all sockets.
 *
 * Receive modes: `reuse` (the above), `fresh` (the receivers keep the bytes, in memory they
 * never touched: the kernel zeroes and maps a page per 4 KiB, as on a migration destination),
 * `touched` (they keep the bytes in memory written once before the clock starts: what the
 * transfer costs once the destination's pages exist).
 *
 *   node dist/bench/tcp-raw.js recv N BYTES MODE   → prints {"ports":[...]} then {"ms":...}
 *   node dist/bench/tcp-raw.js send N BYTES PORTS-JSON
 */
import { fork } from 'node:child_process';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';

const self = fileURLToPath(import.meta.url);

export type RecvMode = 'reuse' | 'fresh' | 'touched';

interface WorkerJob {
  role: 'recv' | 'send';
  bytes: number;
  port?: number;
  mode?: RecvMode;
}

/** Raw throughput in bytes per ms for `sockets` sockets moving `bytes` in total, received as `mode` says. */
export async function rawTcpThroughput(sockets: number, bytes: number, mode: RecvMode = 'reuse'): Promise<number> {
  const recv = fork(self, ['recv', String(sockets), String(bytes), mode], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  const ports = await new Promise<number[]>((resolve, reject) => {
    recv.once('message', (m: { ports: number[] }) => resolve(m.ports));
    recv.once('exit', (code) => reject(new Error(`tcp-raw receiver exited (${code})`)));
  });
  const done = new Promise<number>((resolve) => recv.on('message', (m: { ms?: number }) => m.ms !== undefined && resolve(m.ms)));
  const send = fork(self, ['send', String(sockets), String(bytes), JSON.stringify(ports)], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  const ms = await done;
  send.kill();
  recv.kill();
  return bytes / ms;
}

async function main(): Promise<void> {
  const [role, n, total, arg] = process.argv.slice(2);
  const sockets = Number(n);
  const bytes = Number(total);
  if (role === 'recv') {
    const workers: Worker[] = [];
    const ports: number[] = [];
    for (let i = 0; i < sockets; i++) {
      const w = new Worker(self, { workerData: { role: 'recv', bytes: Math.floor(bytes / sockets), mode: arg as RecvMode } satisfies WorkerJob });
      workers.push(w);
      ports.push(await new Promise<number>((r) => w.once('message', (m: number) => r(m))));
    }
    process.send!({ ports });
    const spans = await Promise.all(workers.map((w) => new Promise<[number, number]>((r) => w.once('message', (m: [number, number]) => r(m)))));
    const start = Math.min(...spans.map((s) => s[0]));
    const end = Math.max(...spans.map((s) => s[1]));
    process.send!({ ms: end - start });
  } else if (role === 'send') {
    const ports = JSON.parse(arg!) as number[];
    for (const port of ports) new Worker(self, { workerData: { role: 'send', bytes: Math.floor(bytes / sockets), port } satisfies WorkerJob });
  }
}

function recvWorker(job: WorkerJob): void {
  const buf = Buffer.alloc(1 << 20);
  const keep = job.mode === 'reuse' ? null : new Uint8Array(new WebAssembly.Memory({ initial: Math.ceil(job.bytes / 65536), maximum: Math.ceil(job.bytes / 65536), shared: true }).buffer);
  if (keep !== null && job.mode === 'touched') for (let i = 0; i < keep.byteLength; i += 4096) keep[i] = 1;
  const srv = net.createServer();
  srv.listen(0, '127.0.0.1', () => {
    const a = srv.address();
    parentPort!.postMessage(typeof a === 'object' && a !== null ? a.port : 0);
  });
  // Accept one connection; read it through a reused buffer (the same user-buffer path the
  // multifd receivers use).
  srv.once('listening', () => {
    const handle = (srv as unknown as { _handle: { onconnection: unknown } })._handle;
    handle.onconnection = (_err: number, clientHandle: unknown): void => {
      let got = 0;
      let start = 0;
      const s = new net.Socket({
        handle: clientHandle,
        readable: true,
        writable: true,
        onread: {
          buffer: keep === null ? buf : () => keep.subarray(got, Math.min(got + (1 << 20), keep.byteLength)),
          callback: (n: number) => {
            if (got === 0) start = performance.timeOrigin + performance.now();
            got += n;
            if (got >= job.bytes) {
              parentPort!.postMessage([start, performance.timeOrigin + performance.now()]);
              s.destroy();
              srv.close();
            }
            return true;
          },
        },
      } as net.SocketConstructorOpts);
      s.on('error', () => undefined);
    };
  });
}

function sendWorker(job: WorkerJob): void {
  const chunk = Buffer.alloc(1 << 20, 0x5a);
  const s = net.connect({ host: '127.0.0.1', port: job.port! });
  s.on('error', () => undefined);
  let sent = 0;
  const pump = (): void => {
    while (sent < job.bytes) {
      sent += chunk.byteLength;
      if (!s.write(chunk)) {
        s.once('drain', pump);
        return;
      }
    }
    s.end();
  };
  s.on('connect', pump);
}

if (isMainThread) {
  if (process.argv[1] === self && process.send !== undefined) void main();
} else {
  const job = workerData as WorkerJob;
  if (job.role === 'recv') recvWorker(job);
  else sendWorker(job);
}
