/**
 * `colo up` acceptance (real processes): kv.wasm as a supervised pair. SIGKILL the primary
 * child: the service answers again on the same address within 1 s, the pair is protected
 * again (a new secondary in COLO) and every acknowledged key is still there; the same with the
 * secondary child SIGKILLed (the primary keeps serving). Plain and multifd checkpoints.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { TestEnv, coloBin, freePort, guests, waitFor } from '../framework/harness.js';
import { AckedWriter, RespClient, countMissing } from '../framework/resp.js';
import { Supervisor, checkpointAfterNow, pidAlive, pidsUsing, qmpOf, timeUntilServing, withTimeout } from '../framework/up.js';

for (const transport of ['plain', 'multifd'] as const) {
  test(`colo up/${transport}: failover on SIGKILL of either child, within 1 s, then protected again`, async (t) => {
    const env = new TestEnv(t);
    const port = await freePort();
    const image = env.image('kv.img', 8 * 1024 * 1024);
    const args = [coloBin, 'up', guests.kv, '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`, '--memory', '256M'];
    args.push('--checkpoint-delay', '200', '--state-dir', env.dir);
    if (transport === 'multifd') args.push('--parallel-connections', '2');
    const sup = new Supervisor(spawn(process.execPath, args, { cwd: env.dir, stdio: ['ignore', 'pipe', 'pipe'] }));
    const clients: { close(): unknown }[] = [];
    env.onCleanup(async () => {
      for (const c of clients) await c.close();
      if (sup.alive) {
        sup.proc.kill('SIGTERM');
        await sup.waitExit(10000).catch(() => sup.proc.kill('SIGKILL'));
      }
      // Whatever it left behind (also when it was killed itself): its children have their QMP
      // sockets in the state folder.
      for (const pid of [...sup.pids, ...pidsUsing(env.dir)]) if (pidAlive(pid)) process.kill(pid, 'SIGKILL');
    });

    const first = await sup.line(/^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 90000);
    const [p1, s1] = [Number(first.m[1]), Number(first.m[2])];
    const s1q = await qmpOf(s1);
    clients.push(s1q);

    // 1. The primary dies.
    const w1 = await AckedWriter.start(port, 'a:');
    clients.push({ close: () => w1.stop() });
    await waitFor('200 acknowledged writes', () => w1.acked.size >= 200, 20000);
    // Killed while the client writes, at no particular point of a checkpoint: with the
    // network compare, whatever the client saw acknowledged is on the secondary.
    const killedAt = performance.now();
    process.kill(p1, 'SIGKILL');
    const primaryFailoverMs = await timeUntilServing(port, killedAt, 5000);
    t.diagnostic(`${transport}: the service answered ${primaryFailoverMs.toFixed(0)} ms after the primary's SIGKILL`);
    assert.ok(primaryFailoverMs < 1000, `the service answers within 1 s of the primary's death (took ${primaryFailoverMs.toFixed(0)} ms)`);
    await withTimeout(w1.ended(), 5000, "the writer's connection to the dead primary to end");
    const acked = new Map(w1.acked);
    const took = await sup.line(new RegExp(`^pair: primary died \\(SIGKILL\\); secondary ${s1} took over on 127\\.0\\.0\\.1:${port}$`), first.at + 1, 5000);
    const second = await sup.line(new RegExp(`^pair: protected \\(primary pid ${s1}, secondary pid (\\d+)\\)$`), took.at + 1, 60000);
    assert.ok(sup.lines.slice(took.at + 1, second.at).includes('pair: re-protecting'), `re-protecting is reported: ${JSON.stringify(sup.lines)}`);
    const s2 = Number(second.m[1]);
    const [p2q, s2q] = [s1q, await qmpOf(s2)];
    clients.push(s2q);
    assert.equal((await p2q.execute<{ status: string }>('query-migrate')).status, 'colo', 'the new primary is in COLO');
    await checkpointAfterNow(s2q);

    const r1 = await RespClient.connect(port);
    clients.push(r1);
    assert.equal(await countMissing(r1, acked), 0, 'every key the primary acknowledged survived it');

    // 2. The secondary dies: the primary keeps serving, then is protected again.
    const w2 = await AckedWriter.start(port, 'b:');
    clients.push({ close: () => w2.stop() });
    await waitFor('200 more acknowledged writes', () => w2.acked.size >= 200, 20000);
    const mark = second.at + 1;
    const killed2At = performance.now();
    process.kill(s2, 'SIGKILL');
    const before = w2.acked.size;
    await waitFor('writes acknowledged after the secondary died', () => w2.acked.size >= before + 50, 1000, 5);
    const secondaryFailoverMs = performance.now() - killed2At;
    t.diagnostic(`${transport}: 50 more writes acknowledged ${secondaryFailoverMs.toFixed(0)} ms after the secondary's SIGKILL`);
    const cont = await sup.line(new RegExp(`^pair: secondary died \\(SIGKILL\\); primary ${s1} continues unprotected$`), mark, 5000);
    const third = await sup.line(new RegExp(`^pair: protected \\(primary pid ${s1}, secondary pid (\\d+)\\)$`), cont.at + 1, 60000);
    assert.ok(sup.lines.slice(cont.at + 1, third.at).includes('pair: re-protecting'));
    const s3q = await qmpOf(Number(third.m[1]));
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
  });
}
