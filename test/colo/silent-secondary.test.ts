/**
 * A COLO secondary that goes silent (SIGSTOP: no FIN, no RST, its sockets open) in a pair run
 * by hand (no `colo up`, no heartbeat): the primary's checkpoint-stall watchdog notices, it
 * goes on alone with every acknowledged write, its clients are served on, and the expected
 * channel shutdown logs no error.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TestEnv, freePort, startKvSourceAndTarget, waitFor, type VmProcess } from '../framework/harness.js';
import { AckedWriter, RespClient, countMissing } from '../framework/resp.js';
import { assertNoErrors } from '../migration/helpers.js';
import { limits } from '../../src/core/limits.js';
import { linkLossGraceMs } from '../../src/colo/driver.js';

async function kvPair(env: TestEnv, multifd: boolean): Promise<{ src: VmProcess; dst: VmProcess; port: number }> {
  const port = await freePort();
  const common = ['--memory', '64M', '--net', `listen=127.0.0.1:${port}`];
  const [src, dst] = await startKvSourceAndTarget(env, common);
  const caps: Record<string, boolean> = multifd ? { 'x-colo': true, multifd: true } : { 'x-colo': true };
  const params: Record<string, number> = multifd ? { 'multifd-channels': 2 } : {};
  await Promise.all([src.setMigration(caps, { ...params, 'x-checkpoint-delay': 200 }), dst.setMigration(caps, params)]);
  await src.waitSerial('kv ready');
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${await dst.listenIncoming()}` });
  await src.waitMigrationStatus('colo', 30000);
  await dst.waitEvent('RESUME', { timeoutMs: 10000 });
  return { src, dst, port };
}

for (const multifd of [false, true]) {
  test(`silent/colo${multifd ? '/multifd' : ''}: a secondary frozen (SIGSTOP) under kv load: the primary goes on alone within the stall bound, serves new clients, and has every acknowledged write; no error line`, async (t) => {
    const env = new TestEnv(t);
    const { src, dst, port } = await kvPair(env, multifd);
    const writer = await AckedWriter.start(port, 'silent:');
    env.onCleanup(() => writer.stop());
    await waitFor('acknowledged writes under COLO', () => writer.acked.size >= 100, 20000);
    const mark = src.qmp.eventCount;
    dst.kill('SIGSTOP');
    env.onCleanup(() => dst.kill('SIGCONT'));
    const frozenAt = performance.now();
    const exit = await src.waitEvent('COLO_EXIT', { after: mark, timeoutMs: limits.coloCheckpointStallMs + linkLossGraceMs + 20000 });
    const ms = performance.now() - frozenAt;
    t.diagnostic(`the primary left COLO ${Math.round(ms)} ms after the freeze`);
    assert.deepEqual(exit.data, { mode: 'primary', reason: 'error' });
    assert.match(src.stderr, / warn colo: primary: nothing moved between the nodes for \d+ ms while a checkpoint waited/);
    // The client's own reply timeout (5 s) is shorter than the stall bound: it may have given
    // up on its connection; a new one is served at once.
    await writer.stop();
    const after = await AckedWriter.start(port, 'after:');
    env.onCleanup(() => after.stop());
    await waitFor('the primary acknowledging writes again', () => after.acked.size >= 50 || undefined, 15000).catch(async (err: unknown) => {
      throw new Error(`${String(err)}; acked ${after.acked.size}, writer ended by ${String(after.endedBy)}, primary ${await src.status()}; its log: ${src.stderr}`);
    });
    await after.stop();
    const c = await RespClient.connect(port);
    env.onCleanup(() => c.close());
    assert.equal(await countMissing(c, writer.acked), 0, `every write acknowledged under COLO is on the primary (${writer.acked.size} acked)`);
    assert.equal(await countMissing(c, after.acked), 0, 'every write acknowledged after is on the primary');
    assert.equal(await src.status(), 'running');
    assertNoErrors(src);
  });
}
