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
import fs from 'node:fs';
import net from 'node:net';
import { TestEnv, coloBin, freePort, guests, pidAlive, pidsUsing, sleep, waitFor } from '../framework/harness.js';
import { spawnSupervisor } from '../framework/up.js';
import { limits } from '../../src/core/limits.js';
import { exitOnConnectGuest } from '../framework/machine.js';
import { QmpClient } from '../../src/control/qmp-client.js';

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
  /** Cut every new connection of the supervisor's driver (its qmp_capabilities enables oob; the heartbeat's does not). */
  refuseControl = false;

  constructor(listenPath: string, targetPath: string) {
    this.listener = net.createServer((client) => {
      const server = net.connect(targetPath);
      const c: Proxied = { n: this.conns.length + 1, client, server, sent: '', cut: false };
      this.conns.push(c);
      client.on('error', () => undefined);
      server.on('error', () => undefined);
      client.on('data', (d: Buffer) => {
        c.sent += d.toString();
        if (this.refuseControl && c.n > 1 && c.sent.includes('"enable"')) {
          this.cut(c);
          return;
        }
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

  /** The supervisor's driver connections (commands, events), oldest first. */
  get controls(): Proxied[] {
    return this.conns.filter((c) => c.sent.includes('"enable"'));
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

/** `colo up` on kv.wasm whose connections to `node` (vm1 the first primary, vm2 the first secondary) pass a QmpProxy; resolves once protected. */
async function pairBehindProxy(env: TestEnv, cutOnFirst: string | null, node: 'vm1' | 'vm2' = 'vm1', guest = guests.kv, extraArgs: string[] = []) {
  const port = await freePort();
  const args = [coloBin, 'up', guest, '--net', `listen=127.0.0.1:${port}`, '--memory', '64M', '--checkpoint-delay', '200', '--state-dir', env.dir, ...extraArgs];
  let proxy: QmpProxy | null = null;
  const sup = spawnSupervisor(env, args, () => proxy?.close());
  // Stop the supervisor once it started the child, before the child's QMP socket is up.
  await waitFor(`colo up to start ${node}`, () => {
    if (!sup.alive) throw new Error(`colo up exited: ${sup.stderr.slice(-2000)}`);
    return pidsUsing(env.dir).some((pid) => {
      try {
        return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(`unix:${env.file(`${node}.qmp`)}\0`);
      } catch {
        return false;
      }
    });
  }, 30000, 2);
  sup.proc.kill('SIGSTOP');
  assert.ok(!fs.existsSync(env.file(`${node}.qmp`)), `stopped before ${node} made its QMP socket (else the test proves nothing)`);
  const sock = env.file(`${node}.qmp`);
  await waitFor(`${node} to make its QMP socket`, () => fs.existsSync(sock), 30000, 5);
  const real = env.file(`${node}-behind-proxy.qmp`);
  fs.renameSync(sock, real);
  proxy = new QmpProxy(sock, real);
  proxy.cutOnFirst = cutOnFirst;
  await waitFor('the proxy to listen', () => fs.existsSync(sock), 5000, 5);
  sup.proc.kill('SIGCONT');
  const first = await sup.line(/^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 90000);
  const p = proxy;
  const what = (): string => `colo up printed: ${sup.timeline()}; proxied connections: ${p.describe()}; its stderr ends: ${sup.stderr.slice(-2500)}`;
  assert.ok(p.controls.length === 1, `the supervisor's connections to ${node} pass the proxy (else the test proves nothing); ${what()}`);
  return { sup, port, proxy: p, real, first, primary: Number(first.m[1]), secondary: Number(first.m[2]), what };
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

test('colo up: the driver\'s QMP connection to the secondary is dropped, then the primary dies: the secondary still takes over (the service was lost)', async (t) => {
  const env = new TestEnv(t);
  const { sup, port, proxy, primary, secondary, first, what } = await pairBehindProxy(env, null, 'vm2');
  proxy.cut(proxy.controls[0]!);
  await sleep(200);
  process.kill(primary, 'SIGKILL');
  const took = await sup.line(/^pair: (primary died \(SIGKILL\); secondary (\d+) took over on .*|failed .*)$/, first.at + 1, 20000);
  assert.equal(took.m[0], `pair: primary died (SIGKILL); secondary ${secondary} took over on 127.0.0.1:${port}`, what());
  assert.equal(proxy.controls.length, 2, `the driver connected to vm2 again; ${what()}`);
  await sup.line(new RegExp(`^pair: protected \\(primary pid ${secondary}, secondary pid \\d+\\)$`), took.at + 1, 60000);
  assert.ok(pidAlive(secondary), what());
});

test('colo up: the driver\'s QMP connection to the primary is down while the primary leaves COLO by itself: the missed COLO_EXIT is caught up on, the out-of-date secondary replaced', async (t) => {
  const env = new TestEnv(t);
  const { sup, proxy, real, primary, secondary, first, what } = await pairBehindProxy(env, null, 'vm1');
  const direct = await QmpClient.connect(`unix:${real}`, { timeoutMs: 5000 });
  env.onCleanup(() => direct.close());
  // The supervisor cannot connect again (the heartbeat can: the primary answers it) while the
  // primary's COLO link breaks and, with no x-colo-lost-heartbeat, it leaves COLO by itself.
  proxy.refuseControl = true;
  proxy.cut(proxy.controls[0]!);
  const mark = direct.eventCount;
  await direct.execute('yank', { instances: [{ type: 'migration' }] });
  await direct.waitEvent('COLO_EXIT', { after: mark, timeoutMs: 15000 });
  assert.deepEqual(sup.lines.slice(first.at + 1), [], `colo up has not heard of it yet; ${what()}`);
  proxy.refuseControl = false;
  const left = await sup.line(new RegExp(`^pair: primary ${primary} left COLO \\(reason error\\); it continues unprotected$`), first.at + 1, 10000);
  await waitFor(`the out-of-date secondary ${secondary} to be killed; ${what()}`, () => !pidAlive(secondary), 5000);
  await sup.line(new RegExp(`^pair: protected \\(primary pid ${primary}, secondary pid \\d+\\)$`), left.at + 1, 60000);
});

for (const heartbeat of [true, false]) {
  const name = heartbeat
    ? "colo up: the driver's QMP connection to the primary is down when its guest exits by itself: the guest's SHUTDOWN is still heard (on the heartbeat's connection), and the pair stops with the guest's status instead of failing over"
    : "colo up --heartbeat-timeout 0: the driver's QMP connection to the primary is down when its guest exits by itself: the guest's SHUTDOWN is still heard (on a second connection that only listens), and the pair stops with the guest's status instead of failing over";
  test(name, async (t) => {
    const env = new TestEnv(t);
    // Accepts one client, then exits with status 3 (both replicas do).
    const guest = exitOnConnectGuest(t, 3);
    const { sup, port, proxy, first, what } = await pairBehindProxy(env, null, 'vm1', guest, heartbeat ? [] : ['--heartbeat-timeout', '0']);
    if (!heartbeat) assert.equal(proxy.heartbeats.length, 0, `no heartbeat: nothing asks query-status; ${what()}`);
    // The supervisor cannot make its driver's connection to the primary again until it exits.
    proxy.refuseControl = true;
    proxy.cut(proxy.controls[0]!);
    const client = net.connect(port, '127.0.0.1');
    client.on('error', () => undefined);
    env.onCleanup(() => {
      client.destroy();
    });
    await sup.waitExit(20000);
    const lines = sup.lines.slice(first.at + 1).filter((l) => !/^pair: the guest of secondary \d+ exited \(exit code 3\)/.test(l));
    assert.deepEqual(lines, ['pair: stopping (the guest exited)', 'pair: stopped'], what());
    assert.equal(sup.exitCode, 3, `the guest's exit status; ${what()}`);
    if (!heartbeat) assert.equal(proxy.heartbeats.length, 0, `still no heartbeat; ${what()}`);
    assert.deepEqual(pidsUsing(env.dir), [], 'no process of the pair is left');
  });
}
