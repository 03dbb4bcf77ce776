/**
 * Live migration between two `colo run` processes on loopback (issue 3's acceptance list):
 * plain and multifd pre-copy of a memwalk guest running at full speed, kv.wasm under client
 * writes, and a shared image in snapshot mode.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { TestEnv, freePort, guests, startKvSourceAndTarget, waitFor } from '../framework/harness.js';
import { AckedWriter, RespClient, countMissing } from '../framework/resp.js';
import { sizeHeap, sizeHeapClaimProblem, sizeHeapGuest, sizeHeapWords } from '../framework/machine.js';
import { assertAdvancing, assertNoErrors, assertStill, memwalkPair, migrateUntilActive, statuses } from './helpers.js';

for (const channels of [0, 2, 4]) {
  const name = channels === 0 ? 'plain' : `multifd ${channels} channels`;
  test(`precopy ${name}: a memwalk guest at full speed arrives whole, runs on; the source stays paused`, async (t) => {
    const env = new TestEnv(t);
    const caps: Record<string, boolean> = channels === 0 ? {} : { multifd: true };
    const params: Record<string, number> = channels === 0 ? {} : { 'multifd-channels': channels };
    const { src, dst, port, region } = await memwalkPair(env, { region: '48M', memory: '128M', capabilities: caps, parameters: params });
    const srcMark = src.qmp.eventCount;
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    const info = await src.waitMigrationStatus('completed', 60000);
    await dst.waitMigrationStatus('completed', 10000);

    assert.equal(await src.status(), 'postmigrate');
    assert.deepEqual(statuses(src, srcMark), ['setup', 'active', 'device', 'completed']);
    assert.ok(src.eventsOf('MIGRATION_PASS', srcMark).length >= 1, 'MIGRATION_PASS events');
    const ram = info.ram as Record<string, number>;
    const regionPages = region.size / 4096;
    // The guest dirtied its whole region during round 1, so later rounds resent it.
    assert.ok(ram.normal! > regionPages, `${ram.normal} normal pages sent for a ${regionPages}-page region: rounds after the first had no dirty pages`);
    assert.ok(typeof info.downtime === 'number' && typeof info['total-time'] === 'number' && typeof info['setup-time'] === 'number');
    // QEMU's split of the bytes: on the multifd channels, and before / during the pause.
    assert.equal(ram['precopy-bytes']! + ram['downtime-bytes']!, ram.transferred, `precopy + downtime bytes = transferred: ${JSON.stringify(ram)}`);
    assert.ok(ram['downtime-bytes']! > 0 && ram['pages-per-second']! > 0, `downtime-bytes and pages-per-second: ${JSON.stringify(ram)}`);
    if (channels === 0) assert.equal(ram['multifd-bytes'], 0);
    // The pages go on the multifd channels; the main channel carries the frames around them.
    else assert.ok(ram['multifd-bytes']! > regionPages * 4096 && ram['multifd-bytes']! < ram.transferred!, `multifd-bytes: ${JSON.stringify(ram)}`);
    t.diagnostic(`total ${String(info['total-time'])} ms, downtime ${String(info.downtime)} ms, ${ram['dirty-sync-count']} dirty syncs, ${ram.normal} pages, ${ram.duplicate} zero pages`);

    await dst.waitEvent('RESUME');
    await assertAdvancing(dst);
    await assertStill(src);
    assert.equal(await dst.memwalkCheck(region), null, 'the target memory passes the memwalk pattern check');
    await dst.qmp.execute('cont');
    await assertAdvancing(dst, 2);
    assertNoErrors(src, dst);
  });
}

test('kv.wasm migrated while a client writes: every acknowledged key reads back on the target, disks equal', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const srcDisk = env.image('src.img', 16 * 1024 * 1024);
  const dstDisk = env.image('dst.img', 16 * 1024 * 1024);
  const common = ['--net', `listen=127.0.0.1:${port}`, '--memory', '256M'];
  // -S: the target stays paused after the switchover, so that both disks can be compared
  // before it runs. A SET the source had received but not yet answered travels in the NIC
  // state and the target executes it once it runs: after that the disks may differ by design.
  const [src, dst] = await startKvSourceAndTarget(env, common, { src: ['--drive', `file=${srcDisk}`], dst: ['--drive', `file=${dstDisk}`, '-S'] });
  await Promise.all([src.setMigration({ multifd: true }), dst.setMigration({ multifd: true })]);
  await src.waitSerial('kv ready');
  const migPort = await dst.listenIncoming();

  const writer = await AckedWriter.start(port, 'k:', (i) => `v-${i}-${'x'.repeat(i % 200)}`);
  env.onCleanup(() => writer.stop());
  const acked = writer.acked;
  await waitFor('200 acknowledged writes', () => acked.size >= 200, 20000);
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  await src.waitMigrationStatus('completed', 60000);
  await writer.ended(); // the switchover resets the connection
  const ackedAtSwitch = new Map(acked);
  await dst.waitMigrationStatus('completed', 10000);
  assert.equal(await dst.status(), 'paused');
  assert.equal(env.hashFile(dstDisk), env.hashFile(srcDisk), 'at the switchover the target disk equals the source disk');
  await dst.qmp.execute('cont');

  const reader = await RespClient.whenServing(port, 'a connection to the target on the service address');
  env.onCleanup(() => reader.close());
  const missing = await countMissing(reader, ackedAtSwitch);
  assert.equal(missing, 0, `${missing} of ${ackedAtSwitch.size} acknowledged keys are missing on the target`);
  t.diagnostic(`${ackedAtSwitch.size} acknowledged keys read back`);
  const info = await src.qmp.execute<{ disk: { blocks: number } }>('query-migrate');
  assert.ok(info.disk.blocks >= 4096, `the whole disk travelled (${info.disk.blocks} blocks)`);
  reader.close();
  await Promise.all([src.stop(), dst.stop()]);
  assertNoErrors(src, dst);
});

test('--snapshot on both sides with one shared image: the image is unchanged, the overlay moved', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const image = env.image('shared.img', 16 * 1024 * 1024, (b) => b.fill(0x5a, 0, 1 << 20));
  const hash = env.hashFile(image);
  const common = ['--net', `listen=127.0.0.1:${port}`, '--memory', '256M', '--drive', `file=${image}`, '--snapshot'];
  const [src, dst] = await startKvSourceAndTarget(env, common);
  await src.waitSerial('kv ready');
  const c = await RespClient.connect(port);
  for (let i = 0; i < 300; i++) assert.equal(await c.command(['SET', `s:${i}`, `value ${i}`]), 'OK');
  c.close();
  const migPort = await dst.listenIncoming();
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  const info = await src.waitMigrationStatus('completed', 60000);
  const blocks = (info.disk as { blocks: number }).blocks;
  assert.ok(blocks > 0 && blocks < 4096, `only the overlay travelled (${blocks} blocks)`);
  await dst.waitMigrationStatus('completed', 10000);
  const r = await RespClient.whenServing(port, 'a connection to the target');
  env.onCleanup(() => r.close());
  assert.equal(await r.command(['GET', 's:299']), 'value 299');
  assert.equal(await r.command(['SET', 'after', 'migration']), 'OK');
  r.close();
  await Promise.all([src.stop(), dst.stop()]);
  assert.equal(env.hashFile(image), hash, 'the shared image is byte-for-byte unchanged');
  assert.ok(fs.statSync(image).size === 16 * 1024 * 1024);
  assertNoErrors(src, dst);
});

test('regression: an idle guest with a drive converges in a few rounds, without a forced stop-and-copy', async (t) => {
  // kv.wasm waiting in accept, a 64 MiB drive, 2 multifd channels, as `colo up` migrates it.
  // Round 1 puts some 100 KB on the wire (the drive is zero) in 100-600 ms of reading, and
  // every round after it 16 zero pages (the asyncify area, reported dirty every round).
  // Before, the rest was priced at 16 x 4 KiB at round 1's rate (about 0.5 MB/s): 30 rounds,
  // then "stop-and-copy forced after 30 rounds ...". 20 ms of downtime-limit keeps that
  // failing on a fast host too (it needed round 1 above 3 MB/s to fit).
  const env = new TestEnv(t);
  const port = await freePort();
  const srcDisk = env.image('src.img', 64 * 1024 * 1024);
  const dstDisk = env.image('dst.img', 64 * 1024 * 1024);
  const common = ['--net', `listen=127.0.0.1:${port}`, '--memory', '64M'];
  const [src, dst] = await startKvSourceAndTarget(env, common, { src: ['--drive', `file=${srcDisk}`], dst: ['--drive', `file=${dstDisk}`] });
  await Promise.all([src.setMigration({ multifd: true }, { 'downtime-limit': 20 }), dst.setMigration({ multifd: true })]);
  await src.waitSerial('kv ready');
  const migPort = await dst.listenIncoming();
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  const info = await src.waitMigrationStatus('completed', 60000);
  await dst.waitMigrationStatus('completed', 10000);
  const syncs = (info.ram as Record<string, number>)['dirty-sync-count']!;
  t.diagnostic(`${syncs} dirty syncs, downtime ${String(info.downtime)} ms`);
  assert.ok(syncs <= 3, `an idle guest took ${syncs} pre-copy rounds`);
  assert.doesNotMatch(src.stderr, /stop-and-copy forced/);
  await Promise.all([src.stop(), dst.stop()]);
  assertNoErrors(src, dst);
});

test('a guest paused on the source arrives paused with identical memory; cont runs it', async (t) => {
  const env = new TestEnv(t);
  const { src, dst, port, region } = await memwalkPair(env, { region: '16M', memory: '64M', capabilities: { multifd: true } });
  // A listening destination has no migration channels to yank yet.
  assert.deepEqual(await dst.qmp.execute('query-yank'), []);
  await assert.rejects(dst.yankMigration(), /No yank instance of type migration/);
  await src.qmp.execute('stop');
  const before = await src.pmem(region.start, region.size);
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  await src.waitMigrationStatus('completed', 30000);
  await dst.waitMigrationStatus('completed', 10000);
  assert.equal(await dst.status(), 'paused');
  assert.ok((await dst.pmem(region.start, region.size)).equals(before), 'the target memory equals the source memory at the pause');
  await dst.qmp.execute('cont');
  await assertAdvancing(dst);
  assertNoErrors(src, dst);
});

test('guest RAM that grows during the migration arrives whole (ramSize frames), byte for byte', async (t) => {
  const env = new TestEnv(t);
  // The shadow tracker (no dirty map in guest memory) so that the whole RAM must be equal.
  const common = ['--memory', '128M', '--dirty-log', 'shadow'];
  // The guest grows 1 MiB every 10 ms up to 96 MiB (about a second). The source starts
  // paused (-S) and runs only once everything else is set up, so that the migration starts
  // while it grows, however long the processes took to start.
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.fill, args: [...common, '-S'], guestArgs: ['96M', 'grow'] }),
    env.startVm({ name: 'dst', guest: guests.fill, args: [...common, '-S', '--incoming', 'defer'], guestArgs: ['96M', 'grow'] }),
  ]);
  await Promise.all([src.setMigration({ multifd: true }, { 'max-bandwidth': 24 * 1024 * 1024 }), dst.setMigration({ multifd: true })]);
  const port = await dst.listenIncoming();
  await src.qmp.execute('cont');
  await src.waitSerial('fill ready');
  const size = async (vm: typeof src): Promise<number> => (await vm.qmp.execute<{ 'base-memory': number }>('query-memory-size-summary'))['base-memory'];
  // Start once the guest has grown a little, slowly enough that it grows on during the rounds.
  await waitFor('the guest to grow its memory to 4 MiB', async () => (await size(src)) >= 4 * 1024 * 1024, 10000, 5);
  const atStart = await size(src);
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  await src.waitMigrationStatus('completed', 60000);
  await dst.waitMigrationStatus('completed', 10000);
  const [srcSize, dstSize] = [await size(src), await size(dst)];
  assert.equal(dstSize, srcSize);
  assert.ok(srcSize > atStart + 4 * 1024 * 1024, `guest RAM grew during the migration (${atStart} → ${srcSize} bytes)`);
  assert.equal(await dst.status(), 'paused');
  const [a, b] = [await src.pmem(0, srcSize), await dst.pmem(0, dstSize)];
  assert.ok(a.equals(b), 'source and target RAM are identical');
  assertNoErrors(src, dst);
});

test('COLO_VERIFY_RAM: the destination checks guest RAM page by page against the source\'s sums before it runs', async (t) => {
  const env = new TestEnv(t);
  const verify = { COLO_VERIFY_RAM: '1', COLO_LOG: 'debug' };
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '96M'], guestArgs: ['32M'], env: verify }),
    env.startVm({ name: 'dst', guest: guests.memwalk, args: ['--memory', '96M', '--incoming', 'defer'], guestArgs: ['32M'], env: verify }),
  ]);
  await Promise.all([src.setMigration({ multifd: true }, { 'multifd-channels': 2 }), dst.setMigration({ multifd: true }, { 'multifd-channels': 2 })]);
  await src.waitSerial('B', { count: 3 });
  const port = await dst.listenIncoming();
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  await src.waitMigrationStatus('completed', 60000);
  await dst.waitMigrationStatus('completed', 10000);
  const checked = await waitFor('the destination to log its RAM check', () => /the incoming migration: guest RAM matches the source's sums \((\d+) pages\)/.exec(dst.stderr) ?? undefined, 5000);
  // The 32 MiB region alone is 8192 pages: the check covered the guest's memory, not a part.
  assert.ok(Number(checked[1]) > 8192, `pages checked: ${checked[1]}`);
  await assertAdvancing(dst);
  assertNoErrors(src, dst);
});

test("a guest growing its memory AssemblyScript's way during a live migration with the store log arrives whole; colo's region moves with it", async (t) => {
  // Every grow moves colo's region (and the dirty log in it) to the new top while the
  // source's migration rounds read and clear that log: a read of the old place would lose
  // marks or clear bytes of guest data.
  const env = new TestEnv(t);
  const o = { grows: 40, pages: 2, paceMs: 60 };
  const guest = sizeHeapGuest(t, o);
  const common = ['--memory', '64M', '--dirty-log', 'store'];
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest, args: [...common, '-S'] }),
    env.startVm({ name: 'dst', guest, args: [...common, '--incoming', 'defer'] }),
  ]);
  await Promise.all([src.setMigration({ multifd: true }, { 'multifd-channels': 2, 'max-bandwidth': 2 * 1024 * 1024 }), dst.setMigration({ multifd: true }, { 'multifd-channels': 2 })]);
  const port = await dst.listenIncoming();
  await src.qmp.execute('cont');
  await waitFor('the source guest to grow its memory 4 times', async () => (await sizeHeapWords(src))[sizeHeap.grows / 4]! >= 4, 20000, 5);
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  const growsAtStart = (await sizeHeapWords(src))[sizeHeap.grows / 4]!;
  await src.waitMigrationStatus('completed', 60000);
  await dst.waitMigrationStatus('completed', 10000);
  assert.ok(growsAtStart < o.grows, `the guest grew during the migration (${growsAtStart} of ${o.grows} grows done at its start)`);
  await dst.waitEvent('RESUME');
  await waitFor('the target guest to finish growing and check its claims twice', async () => {
    const w = await sizeHeapWords(dst);
    return w[sizeHeap.grows / 4] === o.grows && w[sizeHeap.passes / 4]! >= 2;
  }, 30000, 20);
  const w = await sizeHeapWords(dst);
  assert.equal(w[sizeHeap.bad / 4], 0, `the target guest found a changed byte at ${w[sizeHeap.badAddr / 4]}`);
  assert.equal(sizeHeapClaimProblem(await dst.pmem(0, (1 + o.grows * o.pages) * 65536), o), null, 'the claims on the target');
  assertNoErrors(src, dst);
});

for (const multifd of [false, true]) {
  test(`regression: max-bandwidth raised during a throttled round (${multifd ? 'multifd' : 'plain'}) takes effect at once, not at the round's end`, async (t) => {
    const env = new TestEnv(t);
    // Round 1 of the 32 MiB region alone takes about 32 s at 1 MiB/s.
    const { src, dst, port, region } = await memwalkPair(env, { capabilities: { multifd }, parameters: { 'max-bandwidth': 1024 * 1024 } });
    const { mark } = await migrateUntilActive(src, port);
    await new Promise((r) => setTimeout(r, 500));
    const raisedAt = Date.now();
    await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    // Before the fix the rest of round 1 still went at 1 MiB/s.
    await src.waitMigrationStatus('completed', 15000);
    t.diagnostic(`completed ${Date.now() - raisedAt} ms after the limit was lifted`);
    assert.deepEqual(statuses(src, mark), ['setup', 'active', 'device', 'completed']);
    await dst.waitMigrationStatus('completed', 10000);
    await assertAdvancing(dst);
    assert.equal(await dst.memwalkCheck(region), null, 'the target memory passes the memwalk pattern check');
    assertNoErrors(src, dst);
  });
}

for (const multifd of [false, true]) {
  test(`regression: max-bandwidth also paces the disk blocks of a round (${multifd ? 'multifd' : 'plain'}), not only its pages`, async (t) => {
    const env = new TestEnv(t);
    const diskBytes = 16 * 1024 * 1024;
    const srcDisk = env.image('src.img', diskBytes, (b) => b.fill(0xa5));
    const dstDisk = env.image('dst.img', diskBytes);
    const bandwidth = 8 * 1024 * 1024;
    const { src, dst, port } = await memwalkPair(env, {
      region: '4M',
      memory: '32M',
      capabilities: { multifd },
      parameters: { 'max-bandwidth': bandwidth },
      srcArgs: ['--drive', `file=${srcDisk}`],
      dstArgs: ['--drive', `file=${dstDisk}`],
    });
    const { mark } = await migrateUntilActive(src, port);
    const activeAt = performance.now();
    // Round 1 is about 20 MiB (the 4 MiB region, boot's pages, 16 MiB of disk): 2.5 s at 8 MiB/s.
    // Before the fix the disk's 16 MiB went at once, beside (multifd) or after (plain) the pages.
    let worst = 0;
    let sent = 0;
    while (performance.now() - activeAt < 2000) {
      const r = await src.qmp.execute<{ status: string; ram: { transferred: number } }>('query-migrate');
      assert.equal(r.status, 'active', 'round 1 is still being sent');
      sent = r.ram.transferred;
      worst = Math.max(worst, sent - (bandwidth * (performance.now() - activeAt)) / 1000);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    t.diagnostic(`${(sent / 1048576).toFixed(1)} MiB sent in 2 s; at most ${(worst / 1048576).toFixed(1)} MiB ahead of max-bandwidth`);
    assert.ok(worst < 3 * 1024 * 1024, `the migration ran ${(worst / 1048576).toFixed(1)} MiB ahead of max-bandwidth (8 MiB/s)`);
    await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await src.waitMigrationStatus('completed', 20000);
    assert.deepEqual(statuses(src, mark), ['setup', 'active', 'device', 'completed']);
    await dst.waitMigrationStatus('completed', 10000);
    assert.equal(env.hashFile(dstDisk), env.hashFile(srcDisk), 'the target disk equals the source disk');
    assertNoErrors(src, dst);
  });
}

test('regression: max-bandwidth lifted while a throttled multifd round sends its disk blocks: the pages after them go unthrottled', async (t) => {
  const env = new TestEnv(t);
  const diskBytes = 8 * 1024 * 1024;
  const srcDisk = env.image('src.img', diskBytes, (b) => b.fill(0x5a));
  const dstDisk = env.image('dst.img', diskBytes);
  // Round 1: 8 MiB of disk blocks first, then the 16 MiB region's pages: 24 s at 1 MiB/s.
  const { src, dst, port, region } = await memwalkPair(env, {
    region: '16M',
    memory: '64M',
    capabilities: { multifd: true },
    parameters: { 'max-bandwidth': 1024 * 1024 },
    srcArgs: ['--drive', `file=${srcDisk}`],
    dstArgs: ['--drive', `file=${dstDisk}`],
  });
  const { mark } = await migrateUntilActive(src, port);
  await new Promise((r) => setTimeout(r, 500));
  const liftedAt = Date.now();
  await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
  // Before the fix the pages still went at the 1 MiB/s the round started with: 16 s.
  await src.waitMigrationStatus('completed', 8000);
  t.diagnostic(`completed ${Date.now() - liftedAt} ms after the limit was lifted`);
  assert.deepEqual(statuses(src, mark), ['setup', 'active', 'device', 'completed']);
  await dst.waitMigrationStatus('completed', 10000);
  assert.equal(env.hashFile(dstDisk), env.hashFile(srcDisk), 'the target disk equals the source disk');
  await assertAdvancing(dst);
  assert.equal(await dst.memwalkCheck(region), null, 'the target memory passes the memwalk pattern check');
  assertNoErrors(src, dst);
});

test('regression: query-migrate counts the bytes of a throttled multifd round as they go, not 16 packets per channel at a time', async (t) => {
  const env = new TestEnv(t);
  const { src, port } = await memwalkPair(env, { capabilities: { multifd: true }, parameters: { 'max-bandwidth': 1024 * 1024 } });
  const { mark } = await migrateUntilActive(src, port);
  // About 2 MiB went out after 2 s; before the fix the count stayed 0 for 16 s (16 packets of
  // 512 KiB per channel at 512 KiB/s each).
  const ram = await waitFor('query-migrate to count 1 MiB sent', async () => {
    const r = await src.qmp.execute<{ status: string; ram: { transferred: number; remaining: number; total: number } }>('query-migrate');
    assert.equal(r.status, 'active');
    return r.ram.transferred >= 1024 * 1024 ? r.ram : undefined;
  }, 6000, 100);
  assert.ok(ram.remaining < ram.total, `remaining ${ram.remaining} below total ${ram.total}`);
  await src.qmp.execute('migrate_cancel');
  await src.waitMigrationStatus('cancelled', 10000);
  assertNoErrors(src);
});
