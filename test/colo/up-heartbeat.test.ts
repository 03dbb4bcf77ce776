/**
 * `colo up`'s heartbeat (real processes) when its QMP connection to a child goes away while
 * the child lives (a QMP server drops a client that leaves its output unread, as QEMU's does;
 * a connection refused once). The child must be watched again on a new connection: not taken
 * for hung at once (a healthy primary killed, a failover for nothing), and not left unwatched
 * (a later hang never detected, no failover).
 *
 * To break the connection the test puts itself between the supervisor and the primary: while
 * the supervisor is stopped (SIGSTOP) at start, the primary's socket `vm1.qmp` is renamed and a
 * proxy listens under its name, so every connection the supervisor makes to vm1 passes the test.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import { TestEnv, coloBin, freePort, guests, pidAlive, pidsUsing, sleep, waitFor } from '../framework/harness.js';
import { Supervisor } from '../framework/up.js';
import { limits } from '../../src/core/limits.js';

const heartbeatMs = limits.upHeartbeatTimeoutMsDefault;

interface Proxied {
  readonly n: number;
  readonly client: net.Socket;
  readonly server: net.Socket;
  /** What the supervisor sent on it. */
  sent: string;
  cut: boolean;
}

/** Forwards every connection made to `listenPath` to `targetPath`; can cut one of them. */
class QmpProxy {
  readonly conns: Proxied[] = [];
  private readonly listener: net.Server;
  /** Cut a connection as soon as its client sends this (once). */
  cutOnFirst: string | null = null;

  constructor(listenPath: string, targetPath: string) {
    this.listener = net.createServer((client) => {
      const server = net.connect(targetPath);
      const c: Proxied = { n: this.conns.length + 1, client, server, sent: '', cut: false };
      this.conns.push(c);
      client.on('error', () => undefined);
      server.on('error', () => undefined);
      client.on('data', (d: Buffer) => {
        c.sent += d.toString();
        if (this.cutOnFirst !== null && c.sent.includes(this.cutOnFirst)) {
          this.cutOnFirst = null;
          this.cut(c);
          return;
        }
        server.write(d);
      });
      server.on('data', (d: Buffer) => client.write(d));
      client.on('close', () => server.destroy());
      server.on('close', () => client.destroy());
    });
    this.listener.listen(listenPath);
  }

  /** The supervisor's heartbeat connections (those that asked query-status), oldest first. */
  get heartbeats(): Proxied[] {
    return this.conns.filter((c) => c.sent.includes('"query-status"'));
  }

  cut(c: Proxied): void {
    c.cut = true;
    c.client.destroy();
    c.server.destroy();
  }

  close(): void {
    for (const c of this.conns) this.cut(c);
    this.listener.close();
  }

  describe(): string {
    return JSON.stringify(this.conns.map((c) => ({ n: c.n, cut: c.cut, open: !c.client.destroyed, sent: c.sent.slice(0, 200) })));
  }
}

/** `colo up` on kv.wasm whose connections to the primary (vm1) pass a QmpProxy; resolves once protected. */
async function pairBehindProxy(env: TestEnv, cutOnFirst: string | null) {
  const port = await freePort();
  const args = [coloBin, 'up', guests.kv, '--net', `listen=127.0.0.1:${port}`, '--memory', '64M', '--checkpoint-delay', '200', '--state-dir', env.dir];
  const sup = new Supervisor(spawn(process.execPath, args, { cwd: env.dir, stdio: ['ignore', 'pipe', 'pipe'] }));
  let proxy: QmpProxy | null = null;
  env.onCleanup(async () => {
    if (sup.alive) {
      sup.proc.kill('SIGCONT');
      sup.proc.kill('SIGTERM');
      await sup.waitExit(10000).catch(() => sup.proc.kill('SIGKILL'));
    }
    for (const pid of [...sup.pids, ...pidsUsing(env.dir)]) if (pidAlive(pid)) process.kill(pid, 'SIGKILL');
    proxy?.close();
  });
  // The children are spawned with the first line; stop the supervisor before vm1 answers.
  await sup.line(/^pair: starting/, 0, 30000);
  sup.proc.kill('SIGSTOP');
  const sock = env.file('vm1.qmp');
  await waitFor('the primary to make its QMP socket', () => fs.existsSync(sock), 30000, 5);
  fs.renameSync(sock, env.file('vm1-behind-proxy.qmp'));
  proxy = new QmpProxy(sock, env.file('vm1-behind-proxy.qmp'));
  proxy.cutOnFirst = cutOnFirst;
  await waitFor('the proxy to listen', () => fs.existsSync(sock), 5000, 5);
  sup.proc.kill('SIGCONT');
  const first = await sup.line(/^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 90000);
  const p = proxy;
  const what = (): string => `colo up printed: ${sup.timeline()}; proxied connections: ${p.describe()}; its stderr ends: ${sup.stderr.slice(-2500)}`;
  assert.ok(p.conns.length >= 2, `the supervisor's connections to vm1 pass the proxy (else the test proves nothing); ${what()}`);
  return { sup, port, proxy: p, first, primary: Number(first.m[1]), secondary: Number(first.m[2]), what };
}

/** A hung primary (SIGSTOP) is fenced and its secondary takes over within the heartbeat timeout plus slack. */
async function hangFailsOver(pair: Awaited<ReturnType<typeof pairBehindProxy>>, env: TestEnv): Promise<void> {
  const { sup, primary, secondary, first, what } = pair;
  env.onCleanup(() => {
    if (pidAlive(primary)) process.kill(primary, 'SIGKILL');
  });
  const stoppedAt = performance.now();
  process.kill(primary, 'SIGSTOP');
  const boundMs = heartbeatMs + 3000;
  const took = await waitFor(
    `the hung primary to be fenced and its secondary to take over within ${boundMs} ms; ${what()}`,
    () => sup.lines.slice(first.at + 1).find((l) => l === `pair: primary died (killed: hung, no answer to QMP for ${heartbeatMs} ms); secondary ${secondary} took over on 127.0.0.1:${pair.port}`),
    boundMs,
  );
  assert.ok(took, what());
  const ms = performance.now() - stoppedAt;
  assert.ok(ms < boundMs, `took ${ms.toFixed(0)} ms`);
  await waitFor(`the hung primary ${primary} to be gone`, () => !pidAlive(primary), 5000);
}

test('colo up: the heartbeat connection to the primary is dropped while protected: the primary is not taken for hung, is watched again, and a later hang still fails over', async (t) => {
  const env = new TestEnv(t);
  const pair = await pairBehindProxy(env, null);
  const { sup, proxy, primary, secondary, first, what } = pair;
  const hb = await waitFor(`a heartbeat connection to vm1; ${what()}`, () => proxy.heartbeats.find((c) => !c.cut), 5000);
  proxy.cut(hb);
  // Nothing happens (both children live on), and a new heartbeat connection comes.
  await sleep(2 * heartbeatMs);
  assert.deepEqual(sup.lines.slice(first.at + 1), [], `no failover for a dropped connection; ${what()}`);
  assert.ok(pidAlive(primary) && pidAlive(secondary), `both children live on; ${what()}`);
  assert.doesNotMatch(sup.stderr, /has not answered QMP/, what());
  assert.ok(proxy.heartbeats.some((c) => c.n > hb.n), `the heartbeat connected to vm1 again; ${what()}`);
  await hangFailsOver(pair, env);
});

test('colo up: the heartbeat connection to the primary breaks at start (not fenced then): it is made again, and a hang once protected fails over', async (t) => {
  const env = new TestEnv(t);
  // The heartbeat's first query breaks its connection, while the primary cannot be fenced
  // (the pair is starting or protecting).
  const pair = await pairBehindProxy(env, '"query-status"');
  const { proxy, what } = pair;
  assert.ok(proxy.conns.some((c) => c.cut), `the heartbeat's first connection was cut; ${what()}`);
  await waitFor(`the heartbeat to connect to vm1 again; ${what()}`, () => proxy.heartbeats.some((c) => !c.cut), 3000);
  await hangFailsOver(pair, env);
});
