/**
 * What a secondary keeps after it took over. In COLO it holds a RAM cache as large as its
 * guest's memory (every page the initial migration and the checkpoints brought); once it runs
 * alone nothing reads that cache any more, so the survivor must give it back, not run for good
 * with twice its guest's memory.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { TestEnv, guests, waitFor } from '../framework/harness.js';
import { rssBytes } from '../framework/flood.js';
import { assertNoErrors } from '../migration/helpers.js';

const MiB = 1024 * 1024;

/** Force a full GC in `pid` (it runs with --heapsnapshot-signal=SIGUSR2: a heap snapshot collects first), then its RSS. */
async function rssAfterGc(dir: string, pid: number): Promise<number> {
  const before = new Set(fs.readdirSync(dir));
  process.kill(pid, 'SIGUSR2');
  const file = await waitFor(
    `process ${pid} to write its heap snapshot`,
    () => fs.readdirSync(dir).find((n) => n.endsWith('.heapsnapshot') && !before.has(n)),
    30000,
    100,
  );
  // The snapshot is written after the collection; its size settles once it is whole.
  let size = -1;
  await waitFor(
    'the heap snapshot to be whole',
    () => {
      const now = fs.statSync(`${dir}/${file}`).size;
      const done = now > 0 && now === size;
      size = now;
      return done;
    },
    30000,
    300,
  );
  fs.rmSync(`${dir}/${file}`, { force: true });
  return rssBytes(pid);
}

test('colo: a secondary that took over gives its RAM cache back (it does not run alone with twice its guest memory)', async (t) => {
  const env = new TestEnv(t);
  const regionMiB = 192;
  const common = ['--memory', '256M'];
  // fill writes the region once and then idles: the initial migration converges at once.
  const guestArgs = [`${regionMiB}M`, 'data'];
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.fill, args: common, guestArgs }),
    env.startVm({ name: 'dst', guest: guests.fill, args: [...common, '--incoming', 'defer'], guestArgs, env: { NODE_OPTIONS: '--heapsnapshot-signal=SIGUSR2' } }),
  ]);
  await Promise.all([src.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': 500 }), dst.setMigration({ 'x-colo': true }, {})]);
  await src.waitSerial('fill ready', { timeoutMs: 60000 });
  const port = await dst.listenIncoming();
  await src.migrateIntoColo(dst, port, 60000);
  await dst.waitEvent('RESUME', { after: dst.qmp.eventCount, timeoutMs: 15000 });
  const pid = dst.child.pid!;
  // In COLO the cache is in use: no collection could free it (and a heap snapshot there
  // stalls the checkpoints long enough for the primary's watchdog).
  const inColo = rssBytes(pid);

  const mark = dst.qmp.eventCount;
  await dst.yankMigration();
  await dst.qmp.execute('x-colo-lost-heartbeat');
  await dst.waitEvent('COLO_EXIT', { after: mark, timeoutMs: 10000 });
  assert.equal(await dst.status(), 'running', 'the survivor runs');
  const alone = await rssAfterGc(env.dir, pid);
  t.diagnostic(`secondary RSS: ${Math.round(inColo / MiB)} MiB in COLO, ${Math.round(alone / MiB)} MiB after the takeover`);
  // The cache held about the whole filled region; half of it is a margin for the heap snapshot's own memory.
  assert.ok(alone < inColo - (regionMiB / 2) * MiB, `the survivor still holds its RAM cache: RSS ${Math.round(alone / MiB)} MiB after the takeover, ${Math.round(inColo / MiB)} MiB in COLO`);
  await src.stop();
  assertNoErrors(src, dst);
});
