/**
 * `colo up` acceptance (real processes): kv.wasm as a supervised pair. SIGKILL the primary
 * child: the service answers again on the same address within 1 s, the pair is protected
 * again (a new secondary in COLO) and every acknowledged key is still there; the same with the
 * secondary child SIGKILLed (the primary keeps serving). Plain and multifd checkpoints.
 *
 * The same with a hung child (SIGSTOP, not SIGKILL): the process lives on and holds the
 * service address, or the replies the primary keeps back for the compare, so only the
 * heartbeat can notice. The supervisor must fence it (SIGKILL, so that it can never serve
 * again) and fail over as after a crash, within the heartbeat timeout plus 1 s.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { TestEnv, guests, waitFor, withTimeout } from '../framework/harness.js';
import { AckedWriter, RespClient, countMissing } from '../framework/resp.js';
import { checkpointAfterNow, pidAlive, qmpOf, startProtectedPair, timeUntilServing } from '../framework/up.js';
import { limits } from '../../src/core/limits.js';

const heartbeatMs = limits.upHeartbeatTimeoutMsDefault;
const cases = [
  { transport: 'plain', signal: 'SIGKILL', boundMs: 1000, cause: 'SIGKILL' },
  { transport: 'multifd', signal: 'SIGKILL', boundMs: 1000, cause: 'SIGKILL' },
  // Detection (the heartbeat timeout) plus the failover itself.
  { transport: 'plain', signal: 'SIGSTOP', boundMs: heartbeatMs + 1000, cause: `killed: hung, no answer to QMP for ${heartbeatMs} ms` },
] as const;

for (const { transport, signal, boundMs, cause } of cases) {
  const how = signal === 'SIGKILL' ? 'died' : 'hung';
  test(`colo up/${transport}: failover when either child ${signal === 'SIGKILL' ? 'dies (SIGKILL)' : 'hangs (SIGSTOP)'}, within ${boundMs} ms, then protected again`, async (t) => {
    const env = new TestEnv(t);
    const causeRe = cause.replace(/[()]/g, '\\$&');
    const { sup, port, image, first, primary: p1, secondary: s1, clients } = await startProtectedPair(env, transport === 'multifd' ? ['--parallel-connections', '2'] : []);
    const s1q = await qmpOf(s1, sup);
    clients.push(s1q);

    // 1. The primary dies or hangs.
    const w1 = await AckedWriter.start(port, 'a:');
    clients.push({ close: () => w1.stop() });
    await waitFor('200 acknowledged writes', () => w1.acked.size >= 200, 20000);
    // Killed while the client writes, at no particular point of a checkpoint: with the
    // network compare, whatever the client saw acknowledged is on the secondary.
    const killedAt = performance.now();
    process.kill(p1, signal);
    const primaryFailoverMs = await timeUntilServing(port, killedAt, boundMs + 4000);
    t.diagnostic(`${transport}: the service answered ${primaryFailoverMs.toFixed(0)} ms after the primary's ${signal}`);
    assert.ok(primaryFailoverMs < boundMs, `the service answers within ${boundMs} ms of the primary's ${signal} (took ${primaryFailoverMs.toFixed(0)} ms); ${supervisorTail(sup)}`);
    await withTimeout(w1.ended(), 5000, `the writer's connection to the ${how} primary to end`);
    await waitFor(`the ${how} primary ${p1} to be gone`, () => !pidAlive(p1), 5000);
    const acked = new Map(w1.acked);
    const took = await sup.line(new RegExp(`^pair: primary died \\(${causeRe}\\); secondary ${s1} took over on 127\\.0\\.0\\.1:${port}$`), first.at + 1, 5000);
    const second = await sup.line(new RegExp(`^pair: protected \\(primary pid ${s1}, secondary pid (\\d+)\\)$`), took.at + 1, 60000);
    assert.ok(sup.lines.slice(took.at + 1, second.at).includes('pair: re-protecting'), `re-protecting is reported: ${JSON.stringify(sup.lines)}`);
    const s2 = Number(second.m[1]);
    const [p2q, s2q] = [s1q, await qmpOf(s2, sup)];
    clients.push(s2q);
    assert.equal((await p2q.execute<{ status: string }>('query-migrate')).status, 'colo', 'the new primary is in COLO');
    // Its failover is history: in the new COLO session there is none yet (as QEMU resets it).
    assert.deepEqual(await p2q.execute('query-colo-status'), { mode: 'primary', 'last-mode': 'primary', reason: 'none' });
    await checkpointAfterNow(s2q);

    const r1 = await RespClient.connect(port);
    clients.push(r1);
    assert.equal(await countMissing(r1, acked), 0, 'every key the primary acknowledged survived it');

    // 2. The secondary dies or hangs: the primary keeps serving (a hung secondary holds the
    // primary's replies back for the compare until it is fenced), then is protected again.
    const w2 = await AckedWriter.start(port, 'b:');
    clients.push({ close: () => w2.stop() });
    await waitFor('200 more acknowledged writes', () => w2.acked.size >= 200, 20000);
    const mark = second.at + 1;
    const killed2At = performance.now();
    process.kill(s2, signal);
    const before = w2.acked.size;
    // Waits past the bound, so that a failure says how long it did take, and what colo up saw.
    await waitFor(`50 writes acknowledged after the secondary's ${signal}`, () => w2.acked.size >= before + 50, boundMs + 8000, 5);
    const secondaryFailoverMs = performance.now() - killed2At;
    t.diagnostic(`${transport}: 50 more writes acknowledged ${secondaryFailoverMs.toFixed(0)} ms after the secondary's ${signal}`);
    assert.ok(secondaryFailoverMs < boundMs, `50 writes acknowledged within ${boundMs} ms of the secondary's ${signal} (took ${secondaryFailoverMs.toFixed(0)} ms); ${supervisorTail(sup)}`);
    await waitFor(`the ${how} secondary ${s2} to be gone`, () => !pidAlive(s2), 5000);
    const cont = await sup.line(new RegExp(`^pair: secondary died \\(${causeRe}\\); primary ${s1} continues unprotected$`), mark, 5000);
    const third = await sup.line(new RegExp(`^pair: protected \\(primary pid ${s1}, secondary pid (\\d+)\\)$`), cont.at + 1, 60000);
    assert.ok(sup.lines.slice(cont.at + 1, third.at).includes('pair: re-protecting'));
    const s3q = await qmpOf(Number(third.m[1]), sup);
    clients.push(s3q);
    assert.equal((await p2q.execute<{ status: string }>('query-migrate')).status, 'colo', 'the primary is in COLO with the third secondary');
    await w2.stop();
    const acked2 = new Map([...acked, ...w2.acked]);
    await checkpointAfterNow(s3q);
    const r2 = await RespClient.connect(port);
    clients.push(r2);
    assert.equal(await countMissing(r2, acked2), 0, 'every acknowledged key is still there');

    t.diagnostic(`${transport}: ${sup.timeline()}`);

    // 3. SIGTERM: both children go, and so does colo up.
    sup.proc.kill('SIGTERM');
    await sup.waitExit(15000);
    assert.equal(sup.exitCode, 0, sup.stderr.slice(-2000));
    assert.equal(sup.lines.at(-1), 'pair: stopped');
    for (const pid of sup.pids) assert.ok(!pidAlive(pid), `process ${pid} is gone`);

    // The last primary's disk is back in the --drive image: a fresh kv replays every key.
    const again = await env.startVm({ name: 'again', guest: guests.kv, args: ['--memory', '256M', '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`] });
    await again.waitSerial('kv ready');
    const r3 = await RespClient.connect(port);
    clients.push(r3);
    assert.equal(await countMissing(r3, acked2), 0, 'the --drive image holds every acknowledged key');
    const errors = sup.stderr.split('\n').filter((l) => / error /.test(l) || /^colo/.test(l));
    assert.deepEqual(errors, [], 'no error-level log lines from colo up or its children');
    // Fencing is a warning (something did go wrong with a child), once per hung child; a crash is no hang.
    const fenced = sup.stderr.split('\n').filter((l) => / warn /.test(l) && /has not answered QMP/.test(l));
    assert.equal(fenced.length, signal === 'SIGSTOP' ? 2 : 0, `fencing warnings: ${JSON.stringify(fenced)}`);
  });
}

/** What colo up printed, and its log's notable lines (with their times): for a failure's message. */
function supervisorTail(sup: { timeline(): string; stderr: string }): string {
  const notable = sup.stderr.split('\n').filter((l) => / (info|warn|error) /.test(l)).slice(-40);
  return `colo up printed: ${sup.timeline()}; its log ends: ${notable.join(' | ')}`;
}

test('colo up/plain: the COLO link breaks (yank on the primary): the out-of-date secondary is replaced, and a later failover loses nothing', async (t) => {
  const env = new TestEnv(t);
  const { sup, port, first, primary: p1, secondary: s1, clients } = await startProtectedPair(env);
  const p1q = await qmpOf(p1, sup);
  clients.push(p1q);
  const w = await AckedWriter.start(port, 'k:');
  clients.push({ close: () => w.stop() });
  await waitFor('200 acknowledged writes', () => w.acked.size >= 200, 20000);

  // The primary's COLO channels close under it. It waits for x-colo-lost-heartbeat, which
  // nobody sends, then leaves COLO by itself (reason error) and serves on alone: from then on
  // the secondary falls behind every reply the primary releases.
  await p1q.execute('yank', { instances: [{ type: 'migration' }] });
  const left = await sup.line(new RegExp(`^pair: primary ${p1} left COLO \\(reason error\\); it continues unprotected$`), first.at + 1, 15000);
  await waitFor(`the out-of-date secondary ${s1} to be killed`, () => !pidAlive(s1), 5000);
  const afterBreak = w.acked.size;
  await waitFor('200 writes acknowledged by the primary alone', () => w.acked.size >= afterBreak + 200, 20000);
  const again = await sup.line(new RegExp(`^pair: protected \\(primary pid ${p1}, secondary pid (\\d+)\\)$`), left.at + 1, 60000);
  const s2 = Number(again.m[1]);
  const s2q = await qmpOf(s2, sup);
  clients.push(s2q);
  await checkpointAfterNow(s2q);
  // The writer's connection is older than this COLO session: it is answered on under it.
  const atProtect = w.acked.size;
  await waitFor(`the writer connected before the re-protection to be answered under COLO (${w.acked.size} of ${atProtect} + 100)`, () => w.acked.size >= atProtect + 100, 10000);

  // The primary dies: the new secondary takes over with every write, also those of the time
  // the primary served alone (the old secondary, told to take over, would have lost them).
  process.kill(p1, 'SIGKILL');
  await timeUntilServing(port, performance.now(), 5000);
  await withTimeout(w.ended(), 5000, "the writer's connection to the dead primary to end");
  await sup.line(new RegExp(`^pair: primary died \\(SIGKILL\\); secondary ${s2} took over on 127\\.0\\.0\\.1:${port}$`), again.at + 1, 5000);
  assert.ok(!fs.existsSync(path.join(env.dir, 'vm1.qmp')), "the dead first primary's QMP socket file is removed");
  assert.ok(fs.existsSync(path.join(env.dir, 'vm1.serial')), 'its serial output is kept');
  const r = await RespClient.connect(port);
  clients.push(r);
  const acked = new Map(w.acked);
  assert.ok(acked.size >= afterBreak + 200);
  const missing = await countMissing(r, acked).catch((err: unknown) => {
    throw new Error(`${err instanceof Error ? err.message : String(err)}; ${supervisorTail(sup)}`);
  });
  assert.equal(missing, 0, 'every acknowledged key, before and after the link broke, is on the node that took over');
  t.diagnostic(sup.timeline());
  const errors = sup.stderr.split('\n').filter((l) => / error /.test(l));
  assert.deepEqual(errors, [], 'no error-level log lines from colo up or its children');
});

test('colo up/plain: a re-protection whose files cannot be made (the --drive image gone) is a failed attempt, retried; the primary serves on and the supervisor lives', async (t) => {
  const env = new TestEnv(t);
  const { sup, port, image, first, primary: p1, secondary: s1, clients } = await startProtectedPair(env);
  // A new secondary needs an image the size of --drive: take it away, then kill the secondary.
  const aside = `${image}.aside`;
  fs.renameSync(image, aside);
  process.kill(s1, 'SIGKILL');
  const failed = await sup.line(/^pair: unprotected \(secondary \(node \d+\) exited before it was ready: killed: its files could not be made ready: .*ENOENT.*\)$/, first.at + 1, 15000);
  assert.ok(sup.alive, `colo up lives on: ${supervisorTail(sup)}`);
  assert.ok(pidAlive(p1), 'the primary was not taken down with it');
  const r = await RespClient.connect(port);
  clients.push(r);
  assert.equal(await r.command(['SET', 'alone', '1']), 'OK', 'the primary serves alone');
  // The image is back: a later attempt protects the pair again.
  fs.renameSync(aside, image);
  const again = await sup.line(new RegExp(`^pair: protected \\(primary pid ${p1}, secondary pid (\\d+)\\)$`), failed.at + 1, 60000);
  const s2q = await qmpOf(Number(again.m[1]), sup);
  clients.push(s2q);
  await checkpointAfterNow(s2q);
  assert.equal(await r.command(['GET', 'alone']), '1');
  t.diagnostic(sup.timeline());
  const errors = sup.stderr.split('\n').filter((l) => / error /.test(l));
  assert.deepEqual(errors, [], 'no error-level log lines from colo up or its children');
});

test('colo up on an IPv6 address (listen=[::1]:PORT): the pair is protected and serves there, and the secondary takes over on the same address', async (t) => {
  const env = new TestEnv(t);
  // colo up read HOST:PORT with a pattern of its own: [::1] was looked up as a host name, and
  // ::1:PORT passed it but reached the children without brackets, which refused it.
  const { sup, port, first, primary, secondary, clients } = await startProtectedPair(env, [], '::1');
  const c = await RespClient.connect(port, '::1');
  clients.push(c);
  assert.equal(await c.command(['SET', 'k6', 'v6']), 'OK');
  const sq = await qmpOf(secondary, sup);
  clients.push(sq);
  await checkpointAfterNow(sq);
  process.kill(primary, 'SIGKILL');
  await sup.line(new RegExp(`^pair: primary died \\(SIGKILL\\); secondary ${secondary} took over on \\[::1\\]:${port}$`), first.at + 1, 10000);
  const deadline = performance.now() + 5000;
  let after: RespClient | null = null;
  while (after === null) {
    after = await RespClient.connect(port, '::1', 500).catch(() => null);
    if (after === null) {
      assert.ok(performance.now() < deadline, `the secondary to answer on [::1]:${port} within 5 s`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  clients.push(after);
  assert.equal(await after.command(['GET', 'k6']), 'v6', 'the write acknowledged by the primary is on the secondary that took over');
  const errors = sup.stderr.split('\n').filter((l) => / error /.test(l));
  assert.deepEqual(errors, [], 'no error-level log lines from colo up or its children');
});
