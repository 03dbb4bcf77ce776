/**
 * `colo up` with a hung child (real processes): SIGSTOP, not SIGKILL. The process lives on and
 * holds the service address, so only the heartbeat can notice. The supervisor must fence it
 * (SIGKILL, so it can never serve again) and fail over as after a crash:
 *   - a hung primary: the secondary serves on the same address within the heartbeat timeout
 *     plus 1 s, and every acknowledged key is there;
 *   - a hung secondary: the primary's replies, held for the compare, flow again within the same
 *     bound.
 * After each, the pair is protected again.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { TestEnv, coloBin, freePort, guests, waitFor } from '../framework/harness.js';
import { AckedWriter, RespClient, countMissing } from '../framework/resp.js';
import { Supervisor, checkpointAfterNow, pidAlive, pidsUsing, qmpOf, timeUntilServing, withTimeout } from '../framework/up.js';
import { limits } from '../../src/core/limits.js';

const heartbeatMs = limits.upHeartbeatTimeoutMsDefault;
/** Detection (the heartbeat timeout) plus the failover itself (well under 1 s, see up.test.ts). */
const boundMs = heartbeatMs + 1000;

test(`colo up: a hung (SIGSTOPped) child is fenced and failed over within ${boundMs} ms, then protected again`, async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const image = env.image('kv.img', 8 * 1024 * 1024);
  const args = [coloBin, 'up', guests.kv, '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`, '--memory', '256M'];
  args.push('--checkpoint-delay', '200', '--state-dir', env.dir);
  const sup = new Supervisor(spawn(process.execPath, args, { cwd: env.dir, stdio: ['ignore', 'pipe', 'pipe'] }));
  const clients: { close(): unknown }[] = [];
  env.onCleanup(async () => {
    for (const c of clients) await c.close();
    if (sup.alive) {
      sup.proc.kill('SIGTERM');
      await sup.waitExit(10000).catch(() => sup.proc.kill('SIGKILL'));
    }
    for (const pid of [...sup.pids, ...pidsUsing(env.dir)]) if (pidAlive(pid)) process.kill(pid, 'SIGKILL');
  });

  const first = await sup.line(/^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 90000);
  const [p1, s1] = [Number(first.m[1]), Number(first.m[2])];
  const s1q = await qmpOf(s1);
  clients.push(s1q);

  // 1. The primary hangs while a client writes.
  const w1 = await AckedWriter.start(port, 'a:');
  clients.push({ close: () => w1.stop() });
  await waitFor('200 acknowledged writes', () => w1.acked.size >= 200, 20000);
  const stoppedAt = performance.now();
  process.kill(p1, 'SIGSTOP');
  const primaryMs = await timeUntilServing(port, stoppedAt, boundMs + 4000);
  t.diagnostic(`the secondary answered ${primaryMs.toFixed(0)} ms after the primary's SIGSTOP (heartbeat timeout ${heartbeatMs} ms)`);
  assert.ok(primaryMs < boundMs, `the service answers within ${boundMs} ms of the primary hanging (took ${primaryMs.toFixed(0)} ms)`);
  await withTimeout(w1.ended(), 5000, "the writer's connection to the hung primary to end");
  await waitFor(`the hung primary ${p1} to be gone (fenced)`, () => !pidAlive(p1), 5000);
  const acked = new Map(w1.acked);
  const took = await sup.line(new RegExp(`^pair: primary died \\(killed: hung, no answer to QMP for ${heartbeatMs} ms\\); secondary ${s1} took over on 127\\.0\\.0\\.1:${port}$`), first.at + 1, 5000);
  const second = await sup.line(new RegExp(`^pair: protected \\(primary pid ${s1}, secondary pid (\\d+)\\)$`), took.at + 1, 60000);
  const s2 = Number(second.m[1]);
  const s2q = await qmpOf(s2);
  clients.push(s2q);
  await checkpointAfterNow(s2q);
  const r1 = await RespClient.connect(port);
  clients.push(r1);
  assert.equal(await countMissing(r1, acked), 0, 'every key the hung primary acknowledged is on the secondary that took over');

  // 2. The secondary hangs: the primary holds its replies for the compare until the secondary is
  // fenced and the primary goes on alone.
  const w2 = await AckedWriter.start(port, 'b:');
  clients.push({ close: () => w2.stop() });
  await waitFor('200 more acknowledged writes', () => w2.acked.size >= 200, 20000);
  const stopped2At = performance.now();
  process.kill(s2, 'SIGSTOP');
  const before = w2.acked.size;
  await waitFor('50 writes acknowledged after the secondary hung', () => w2.acked.size >= before + 50, boundMs + 4000, 5);
  const secondaryMs = performance.now() - stopped2At;
  t.diagnostic(`50 more writes acknowledged ${secondaryMs.toFixed(0)} ms after the secondary's SIGSTOP`);
  assert.ok(secondaryMs < boundMs, `writes flow again within ${boundMs} ms of the secondary hanging (took ${secondaryMs.toFixed(0)} ms)`);
  await waitFor(`the hung secondary ${s2} to be gone (fenced)`, () => !pidAlive(s2), 5000);
  const cont = await sup.line(new RegExp(`^pair: secondary died \\(killed: hung, no answer to QMP for ${heartbeatMs} ms\\); primary ${s1} continues unprotected$`), second.at + 1, 5000);
  const third = await sup.line(new RegExp(`^pair: protected \\(primary pid ${s1}, secondary pid (\\d+)\\)$`), cont.at + 1, 60000);
  const s3q = await qmpOf(Number(third.m[1]));
  clients.push(s3q);
  await w2.stop();
  const acked2 = new Map([...acked, ...w2.acked]);
  await checkpointAfterNow(s3q);
  const r2 = await RespClient.connect(port);
  clients.push(r2);
  assert.equal(await countMissing(r2, acked2), 0, 'every acknowledged key is still there');
  t.diagnostic(sup.timeline());

  sup.proc.kill('SIGTERM');
  await sup.waitExit(15000);
  assert.equal(sup.exitCode, 0, sup.stderr.slice(-2000));
  // The fencing is logged at warn (something did go wrong with a child); nothing at error.
  const warns = sup.stderr.split('\n').filter((l) => / warn /.test(l) && /has not answered QMP/.test(l));
  assert.equal(warns.length, 2, `one fencing warning per hung child: ${sup.stderr.slice(-3000)}`);
  const errors = sup.stderr.split('\n').filter((l) => / error /.test(l));
  assert.deepEqual(errors, [], 'no error-level log lines from colo up or its children');
});
