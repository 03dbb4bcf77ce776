/**
 * COLO failover (issue 4's acceptance, the seed's eight tests): a memwalk guest protected by a
 * primary and a secondary process on loopback, plain or multifd checkpoints, then the primary
 * or the secondary declared lost — between checkpoints or in the middle of one.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { TestEnv, freePort, guests, memwalkRegion, sleep, waitFor } from '../framework/harness.js';
import { sizeHeap, sizeHeapClaimProblem, sizeHeapGuest, sizeHeapWords, watGuest } from '../framework/machine.js';
import { assertAdvancing, assertNoErrors, assertStill } from '../migration/helpers.js';
import { limits } from '../../src/core/limits.js';

for (const transport of ['plain', 'multifd'] as const) {
  for (const side of ['primary', 'secondary'] as const) {
    for (const midCheckpoint of [false, true]) {
      const name = `colo/${transport}/${side}_failover${midCheckpoint ? '_checkpoint' : ''}`;
      test(name, async (t) => {
        const started = performance.now();
        const env = new TestEnv(t);
        const image = env.image('shared.img', 4 * 1024 * 1024);
        const common = ['--memory', '64M', '--drive', `file=${image}`, '--snapshot'];
        const guestArgs = ['8M'];
        const [src, dst] = await Promise.all([
          env.startVm({ name: 'src', guest: guests.memwalk, args: common, guestArgs }),
          env.startVm({ name: 'dst', guest: guests.memwalk, args: [...common, '--incoming', 'defer'], guestArgs }),
        ]);
        const caps: Record<string, boolean> = transport === 'multifd' ? { 'x-colo': true, multifd: true } : { 'x-colo': true };
        const params: Record<string, number> = transport === 'multifd' ? { 'multifd-channels': 2 } : {};
        await Promise.all([src.setMigration(caps, { ...params, 'x-checkpoint-delay': 300 }), dst.setMigration(caps, params)]);
        await src.waitSerial('B', { count: 3 });
        const region = memwalkRegion(src.serial());
        assert.ok(region, 'memwalk printed its region');
        const port = await dst.listenIncoming();

        await src.migrateIntoColo(dst, port);
        assert.equal(await dst.migrationStatus(), 'colo');
        await Promise.all([assertAdvancing(src, 1), assertAdvancing(dst, 1)]);

        // Three checkpoints: three RESUME on the target after its first.
        for (let i = 0; i < 3; i++) {
          const mark = dst.qmp.eventCount;
          await dst.waitEvent('RESUME', { after: mark, timeoutMs: 15000 });
        }
        await Promise.all([assertAdvancing(src, 1), assertAdvancing(dst, 1)]);
        // An 8 MiB walk is copied in each pause: the PVM ran on while its checkpoints travelled.
        const counters = ((await src.qmp.execute('query-migrate')) as { 'x-colo': Record<string, number> })['x-colo'];
        assert.ok(counters['checkpoints-copied']! >= 3 && counters['checkpoints-sent-from-ram'] === 0, `checkpoints copied in the pause (${JSON.stringify(counters)})`);
        // In COLO, as QEMU reports it: no failover yet, so no reason.
        assert.deepEqual(await src.qmp.execute('query-colo-status'), { mode: 'primary', 'last-mode': 'primary', reason: 'none' });
        assert.deepEqual(await dst.qmp.execute('query-colo-status'), { mode: 'secondary', 'last-mode': 'secondary', reason: 'none' });
        if (midCheckpoint) await dst.waitEvent('STOP', { after: dst.qmp.eventCount, timeoutMs: 15000 });

        const survivor = side === 'primary' ? src : dst;
        const other = side === 'primary' ? dst : src;
        const mark = survivor.qmp.eventCount;
        await survivor.yankMigration();
        await survivor.qmp.execute('x-colo-lost-heartbeat');
        const exit = await survivor.waitEvent('COLO_EXIT', { after: mark, timeoutMs: 10000 });
        assert.deepEqual(exit.data, { mode: side, reason: 'request' });
        const status = await survivor.qmp.execute<Record<string, unknown>>('query-colo-status');
        assert.deepEqual(status, { mode: 'none', 'last-mode': side, reason: 'request' });
        await assertAdvancing(survivor, 3);
        assert.equal(await survivor.status(), 'running');
        // The other node's log is checked once it is stopped: a secondary left waiting must not
        // have applied what came after the break either.
        await other.stop();
        if (side === 'secondary') assert.equal(await survivor.memwalkCheck(region), null, 'the secondary memory passes the memwalk pattern check');
        assertNoErrors(src, dst);
        t.diagnostic(`${name}: ${Math.round(performance.now() - started)} ms`);
      });
    }
  }
}

test('colo: a checkpoint too large to copy goes from guest RAM with the PVM paused; the secondary takes over with the right memory', async (t) => {
  // Each checkpoint carries the whole 80 MiB walk: above limits.coloCheckpointCopyBytesMax.
  const env = new TestEnv(t);
  const common = ['--memory', '128M'];
  const guestArgs = ['80M'];
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.memwalk, args: common, guestArgs }),
    env.startVm({ name: 'dst', guest: guests.memwalk, args: [...common, '--incoming', 'defer'], guestArgs }),
  ]);
  const caps = { 'x-colo': true, multifd: true };
  await Promise.all([src.setMigration(caps, { 'multifd-channels': 2, 'x-checkpoint-delay': 300 }), dst.setMigration(caps, { 'multifd-channels': 2 })]);
  await src.waitSerial('B', { count: 2 });
  const region = memwalkRegion(src.serial());
  assert.ok(region, 'memwalk printed its region');
  assert.ok(region.size > limits.coloCheckpointCopyBytesMax, 'the walk is larger than a checkpoint copy may be');
  const port = await dst.listenIncoming();
  await src.migrateIntoColo(dst, port, 60000);
  for (let i = 0; i < 2; i++) await dst.waitEvent('RESUME', { after: dst.qmp.eventCount, timeoutMs: 30000 });
  const counters = ((await src.qmp.execute('query-migrate')) as { 'x-colo': Record<string, number> })['x-colo'];
  assert.ok(counters['checkpoints-sent-from-ram']! >= 2 && counters['checkpoints-copied'] === 0, `checkpoints sent from RAM (${JSON.stringify(counters)})`);
  await Promise.all([assertAdvancing(src, 1), assertAdvancing(dst, 1)]);
  const mark = dst.qmp.eventCount;
  await dst.yankMigration();
  await dst.qmp.execute('x-colo-lost-heartbeat');
  assert.deepEqual((await dst.waitEvent('COLO_EXIT', { after: mark, timeoutMs: 10000 })).data, { mode: 'secondary', reason: 'request' });
  await assertAdvancing(dst, 2);
  await src.stop();
  assert.equal(await dst.memwalkCheck(region), null, 'the secondary memory passes the memwalk pattern check');
  assertNoErrors(src, dst);
});

test('colo: the destination refuses COLO when its own x-colo is off; the source runs on', async (t) => {
  const env = new TestEnv(t);
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '64M'], guestArgs: ['8M'] }),
    env.startVm({ name: 'dst', guest: guests.memwalk, args: ['--memory', '64M', '--incoming', 'defer'], guestArgs: ['8M'] }),
  ]);
  await src.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': 300 });
  await src.waitSerial('B', { count: 2 });
  const port = await dst.listenIncoming();
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  const info = await src.waitMigrationStatus('failed', 30000);
  assert.match(String(info['error-desc']), /x-colo/);
  await assertAdvancing(src, 2);
  await assert.rejects(src.qmp.execute('x-colo-lost-heartbeat'), /not in COLO mode/);
  assert.deepEqual(await src.qmp.execute('query-colo-status'), { mode: 'none', 'last-mode': 'none', reason: 'none' });
});

test('colo: x-colo set on a destination already listening (--incoming tcp:) counts: it enters COLO as the secondary', async (t) => {
  // The README's order: the secondary listens from its command line, x-colo comes after.
  const env = new TestEnv(t);
  const port = await freePort();
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '64M'], guestArgs: ['8M'] }),
    env.startVm({ name: 'dst', guest: guests.memwalk, args: ['--memory', '64M', '--incoming', `tcp:127.0.0.1:${port}`], guestArgs: ['8M'] }),
  ]);
  await Promise.all([src.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': 200 }), dst.setMigration({ 'x-colo': true })]);
  await src.waitSerial('B', { count: 2 });
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  await src.waitMigrationStatus('colo', 30000);
  // The first RESUME starts the SVM; two more are two checkpoints applied.
  await dst.waitEvent('RESUME', { nth: 3, timeoutMs: 15000 });
  assert.equal(await dst.migrationStatus(), 'colo');
  assert.deepEqual(await dst.qmp.execute('query-colo-status'), { mode: 'secondary', 'last-mode': 'secondary', reason: 'none' });
  assert.deepEqual(await src.qmp.execute('query-colo-status'), { mode: 'primary', 'last-mode': 'primary', reason: 'none' });
  await Promise.all([assertAdvancing(src, 1), assertAdvancing(dst, 1)]);
  assertNoErrors(src, dst);
});

test('colo: a broken link: the primary goes on alone (reason error), the secondary waits for x-colo-lost-heartbeat', async (t) => {
  const env = new TestEnv(t);
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '64M'], guestArgs: ['8M'] }),
    env.startVm({ name: 'dst', guest: guests.memwalk, args: ['--memory', '64M', '--incoming', 'defer'], guestArgs: ['8M'] }),
  ]);
  await Promise.all([src.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': 200 }), dst.setMigration({ 'x-colo': true })]);
  await src.waitSerial('B', { count: 2 });
  const port = await dst.listenIncoming();
  const [srcMark, dstMark] = [src.qmp.eventCount, dst.qmp.eventCount];
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  await src.waitMigrationStatus('colo', 30000);
  await dst.waitEvent('RESUME', { nth: 2, timeoutMs: 15000 });
  // cont of a running VM in COLO changes nothing; only a checkpoint that holds it refuses it (QEMU's text).
  for (const vm of [src, dst]) await vm.qmp.execute('cont').catch((err: Error) => assert.match(err.message, /^COLO checkpoint in progress$/));
  await src.yankMigration();
  const pe = await src.waitEvent('COLO_EXIT', { after: srcMark, timeoutMs: 10000 });
  assert.deepEqual(pe.data, { mode: 'primary', reason: 'error' });
  // The secondary does not promote itself: no COLO_EXIT until it is told.
  await new Promise((r) => setTimeout(r, 3000));
  assert.equal(dst.qmp.events.filter((e) => e.index >= dstMark && e.event === 'COLO_EXIT').length, 0, 'the secondary took over on its own');
  // Said twice at once (a manager may repeat itself): one failover runs. The second is accepted
  // while that failover runs, and refused as for any VM out of COLO if it already finished.
  const [first, second] = await Promise.allSettled([dst.qmp.execute('x-colo-lost-heartbeat', {}, { oob: true }), dst.qmp.execute('x-colo-lost-heartbeat', {}, { oob: true })]);
  assert.equal(first.status, 'fulfilled', 'the first x-colo-lost-heartbeat is carried out');
  if (second.status === 'rejected') assert.match(String(second.reason), /not in COLO mode/);
  const se = await dst.waitEvent('COLO_EXIT', { after: dstMark, timeoutMs: 10000 });
  assert.equal((se.data as { mode: string }).mode, 'secondary');
  await Promise.all([assertAdvancing(src, 2), assertAdvancing(dst, 2)]);
  assert.equal(dst.qmp.events.filter((e) => e.index >= dstMark && e.event === 'COLO_EXIT').length, 1, 'one COLO_EXIT');
  assert.deepEqual(await dst.qmp.execute('query-colo-status'), { mode: 'none', 'last-mode': 'secondary', reason: 'request' });
  // Once it is done, COLO is over: as in QEMU.
  await assert.rejects(dst.qmp.execute('x-colo-lost-heartbeat'), /not in COLO mode/);
  assert.equal(await src.migrationStatus(), 'completed');
  assertNoErrors(src, dst);
});

/**
 * A guest growing its memory AssemblyScript's way under COLO, then a takeover by the secondary.
 * `svmAhead`: the primary is stopped (SIGSTOP) until the secondary has grown further than it,
 * so that the next checkpoint brings the secondary a smaller guest than its own.
 */
async function growingGuestUnderColo(t: TestContext, svmAhead: boolean): Promise<void> {
  // Both replicas grow, each moving colo's region up as it grows.
  const env = new TestEnv(t);
  const o = { grows: 40, pages: 2, paceMs: 150 };
  const guest = sizeHeapGuest(t, o);
  const common = ['--memory', '64M'];
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest, args: common }),
    env.startVm({ name: 'dst', guest, args: [...common, '--incoming', 'defer'] }),
  ]);
  await Promise.all([src.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': 100 }), dst.setMigration({ 'x-colo': true })]);
  const port = await dst.listenIncoming();
  await src.migrateIntoColo(dst, port);
  const atColo = await grows(src);
  t.diagnostic(`grows at COLO start: ${atColo}`);
  assert.ok(atColo < o.grows - 8, `the guest grows under COLO (${atColo} of ${o.grows} grows done when COLO began)`);
  if (svmAhead) await secondaryRunsAhead(src, dst, 3, o.grows);
  await waitFor('the primary guest to finish growing and check its claims', async () => {
    const w = await sizeHeapWords(src);
    return w[sizeHeap.grows / 4] === o.grows && w[sizeHeap.passes / 4]! >= 1;
  }, 60000, 50);
  for (let i = 0; i < 3; i++) await dst.waitEvent('RESUME', { after: dst.qmp.eventCount, timeoutMs: 15000 });
  assert.equal(await src.migrationStatus(), 'colo', 'still in COLO after the guest grew');
  assert.equal(await dst.migrationStatus(), 'colo', 'the secondary too');
  const mark = dst.qmp.eventCount;
  await dst.yankMigration();
  await dst.qmp.execute('x-colo-lost-heartbeat');
  assert.deepEqual((await dst.waitEvent('COLO_EXIT', { after: mark, timeoutMs: 10000 })).data, { mode: 'secondary', reason: 'request' });
  await src.stop();
  const passes = (await sizeHeapWords(dst))[sizeHeap.passes / 4]!;
  await waitFor('the secondary guest to check its claims twice more', async () => (await sizeHeapWords(dst))[sizeHeap.passes / 4]! >= passes + 2, 20000, 20);
  const w = await sizeHeapWords(dst);
  assert.equal(w[sizeHeap.bad / 4], 0, `the secondary guest found a changed byte at ${w[sizeHeap.badAddr / 4]}`);
  assert.equal(sizeHeapClaimProblem(await dst.pmem(0, (1 + o.grows * o.pages) * 65536), o), null, 'the claims on the secondary');
  assertNoErrors(src, dst);
}

test("colo: a guest growing its memory AssemblyScript's way keeps checkpointing; the secondary takes over with every claim whole", async (t) => {
  await growingGuestUnderColo(t, false);
});

test('colo: a secondary that ran ahead of its primary and grew more loads the smaller primary\'s checkpoints and stays in COLO', async (t) => {
  // Before, its memory could not shrink to the checkpoint's: "the state has 59 memory pages,
  // fewer than this guest's 83", and the secondary dropped out of COLO.
  await growingGuestUnderColo(t, true);
});

type TestVm = Awaited<ReturnType<TestEnv['startVm']>>;

/** Its growing-heap guest's grow count (sizeHeapGuest). */
async function grows(vm: TestVm): Promise<number> {
  return (await sizeHeapWords(vm))[sizeHeap.grows / 4]!;
}

/**
 * The primary (in COLO with `dst`) is stopped until the secondary's guest has grown `ahead`
 * times more, then runs again; `growsMax`: how many times the guest grows in all. No
 * checkpoint while it is stopped: one in flight would keep the secondary paused (status colo)
 * until the primary runs again, its guest not growing. Checkpoints are held off meanwhile
 * (x-checkpoint-delay set high starts at most one more: in flight, or at once), and set back
 * after, which brings the next at once. Returns the secondary's QMP event count from before
 * that next checkpoint.
 */
async function secondaryRunsAhead(src: TestVm, dst: TestVm, ahead: number, growsMax: number): Promise<number> {
  const delayMs = (await src.qmp.execute<Record<string, number>>('query-migrate-parameters'))['x-checkpoint-delay']!;
  await src.setMigration({}, { 'x-checkpoint-delay': 3600000 });
  for (let attempt = 1; ; attempt++) {
    await waitFor('the secondary to run, between checkpoints', async () => (await dst.status()) === 'running', 15000, 10);
    const primaryGrows = await grows(src);
    assert.ok(primaryGrows + ahead <= growsMax, `the primary's guest grew ${primaryGrows} of ${growsMax} times before it was stopped: the secondary cannot grow ${ahead} times more (the processes took too long to start); else the test proves nothing`);
    src.child.kill('SIGSTOP');
    try {
      const outcome = await waitFor(`the secondary to grow ${ahead} times more than the stopped primary (${primaryGrows})`, async () => {
        if ((await grows(dst)) >= primaryGrows + ahead) return 'ahead';
        return (await dst.status()) === 'colo' ? 'in a checkpoint' : undefined;
      }, 30000, 10);
      if (outcome === 'ahead') break;
      // The last checkpoint came after all, between the status and the stop: let it end.
      assert.ok(attempt < 3, `the secondary was in a checkpoint each time the primary was stopped (${attempt} times)`);
    } finally {
      src.child.kill('SIGCONT');
    }
  }
  const resumes = dst.qmp.eventCount;
  await src.setMigration({}, { 'x-checkpoint-delay': delayMs });
  return resumes;
}

/**
 * COLO from `src` to `dst` (x-colo set on both); then the secondary runs `ahead` grows ahead
 * (secondaryRunsAhead), and takes over right after loading the next (smaller) checkpoint:
 * yank, x-colo-lost-heartbeat, COLO_EXIT.
 */
async function secondaryAheadTakesOver(src: TestVm, dst: TestVm, ahead: number, growsMax: number): Promise<void> {
  await src.migrateIntoColo(dst, await dst.listenIncoming());
  const resumes = await secondaryRunsAhead(src, dst, ahead, growsMax);
  // The next checkpoint (at once) is the primary's smaller guest; the secondary takes over at once.
  await dst.waitEvent('RESUME', { after: resumes, timeoutMs: 15000 });
  const mark = dst.qmp.eventCount;
  await dst.yankMigration();
  await dst.qmp.execute('x-colo-lost-heartbeat');
  await dst.waitEvent('COLO_EXIT', { after: mark, timeoutMs: 10000 });
}

test('colo with the shadow tracker: a secondary that ran ahead takes over right after loading a smaller checkpoint; as a primary it then sends every page its guest writes again', async (t) => {
  // The apply zeroes what the ahead secondary had written above the checkpoint's region; its
  // shadow tracker kept the old bytes there. The guest, replaying, grew back and wrote the
  // same bytes: no change for the shadow, so, as the new primary, it never sent those pages
  // ("the checkpoint: guest RAM differs from the source's in 16 pages" on the new secondary).
  const env = new TestEnv(t);
  const o = { grows: 20, pages: 2, paceMs: 700 };
  const guest = sizeHeapGuest(t, o);
  const common = ['--memory', '64M', '--dirty-log', 'shadow'];
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest, args: common }),
    env.startVm({ name: 'dst', guest, args: [...common, '--incoming', 'defer'] }),
  ]);
  await Promise.all([src.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': 100 }), dst.setMigration({ 'x-colo': true })]);
  await secondaryAheadTakesOver(src, dst, 2, o.grows);
  await src.stop();
  assert.ok((await grows(dst)) < o.grows - 2, 'the guest has growing left to do');

  // COLO again, the old secondary now the primary, while its guest grows back.
  const third = await env.startVm({ name: 'third', guest, args: [...common, '--incoming', 'defer'] });
  await Promise.all([dst.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': 100 }), third.setMigration({ 'x-colo': true })]);
  await dst.migrateIntoColo(third, await third.listenIncoming());
  await waitFor('the guest to finish growing', async () => (await grows(dst)) === o.grows, 60000, 20);
  for (let i = 0; i < 3; i++) await third.waitEvent('RESUME', { after: third.qmp.eventCount, timeoutMs: 15000 });
  assert.equal(await third.migrationStatus(), 'colo', 'the new secondary applies every checkpoint');
  const mark3 = third.qmp.eventCount;
  await third.yankMigration();
  await third.qmp.execute('x-colo-lost-heartbeat');
  await third.waitEvent('COLO_EXIT', { after: mark3, timeoutMs: 10000 });
  await dst.stop();
  const passes = (await sizeHeapWords(third))[sizeHeap.passes / 4]!;
  await waitFor('the new secondary guest to check its claims twice more', async () => (await sizeHeapWords(third))[sizeHeap.passes / 4]! >= passes + 2, 20000, 20);
  const w = await sizeHeapWords(third);
  assert.equal(w[sizeHeap.bad / 4], 0, `the guest found a changed byte at ${w[sizeHeap.badAddr / 4]}`);
  assertNoErrors(src, dst, third);
});

for (const via of ['tcp', 'file'] as const) {
  test(`a node whose memory is larger than its guest and colo's region (a secondary that ran ahead, then took over) migrates (${via}) to a target with a smaller --memory that holds the guest`, async (t) => {
    // Before, the setup announced the whole memory: "the state has … KiB of memory, above this
    // machine's maximum" [STATE_MEMORY], although everything above the region is zero.
    const env = new TestEnv(t);
    // Room to grow: the primary's guest grows on while the processes start and migrate (seconds
    // under load); the secondary's lead is time to stop it before it grows back (ahead × paceMs).
    const o = { grows: 40, pages: 2, paceMs: 600 };
    const ahead = 6;
    const guest = sizeHeapGuest(t, o);
    // The shadow tracker: colo's region (the asyncify area only) does not depend on --memory.
    const shadow = ['--dirty-log', 'shadow'];
    const [src, dst] = await Promise.all([
      env.startVm({ name: 'src', guest, args: ['--memory', '64M', ...shadow] }),
      env.startVm({ name: 'dst', guest, args: ['--memory', '64M', ...shadow, '--incoming', 'defer'] }),
    ]);
    await Promise.all([src.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': 100 }), dst.setMigration({ 'x-colo': true })]);
    const memoryBytes = async (vm: typeof src) => (await vm.qmp.execute<{ 'base-memory': number }>('query-memory-size-summary'))['base-memory'];
    await secondaryAheadTakesOver(src, dst, ahead, o.grows);
    // Stopped before its guest grows back into the memory it has above its region.
    await dst.qmp.execute('stop');
    await src.stop();
    const g = await grows(dst);
    const reservedPages = Math.ceil(limits.asyncifyStackBytes / limits.wasmPageBytes);
    const stateBytes = (1 + g * o.pages + reservedPages) * limits.wasmPageBytes;
    const dstMemory = await memoryBytes(dst);
    t.diagnostic(`guest after ${g} grows; the state needs ${stateBytes} bytes, the memory is ${dstMemory}`);
    assert.ok(dstMemory > stateBytes, `the survivor's memory (${dstMemory} bytes) is larger than its guest and colo's region (${stateBytes}); else the test proves nothing`);

    // A target whose --memory holds the guest and the region, and not the survivor's whole memory.
    const target = ['--memory', String(stateBytes), ...shadow];
    let third: typeof src;
    if (via === 'tcp') {
      third = await env.startVm({ name: 'third', guest, args: [...target, '--incoming', 'defer'] });
      await dst.setMigration({ 'x-colo': false }); // a plain migration this time
      await dst.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${await third.listenIncoming()}` });
      await dst.waitMigrationStatus('completed', 30000);
      await third.waitMigrationStatus('completed', 10000);
    } else {
      const file = env.file('survivor.state');
      await dst.qmp.execute('migrate', { uri: `file:${file}` });
      await dst.waitMigrationStatus('completed', 30000);
      third = await env.startVm({ name: 'third', guest, args: [...target, '-S', '--incoming', `file:${file}`] });
    }
    assert.equal(await third.status(), 'paused', 'the guest was stopped on the source: it arrives paused');
    assert.equal(await memoryBytes(third), stateBytes);
    const guestBytes = (1 + g * o.pages) * limits.wasmPageBytes;
    const [a, b] = [await dst.pmem(0, guestBytes), await third.pmem(0, guestBytes)];
    assert.ok(a.equals(b), 'the target guest memory equals the source guest memory');
    assert.equal(sizeHeapClaimProblem(b, { grows: g, pages: o.pages }), null, 'the claims on the target');
    assertNoErrors(dst, third);
  });
}

/**
 * A guest whose run diverges on a COLO secondary: it counts its turns (u32 at 96) and traps
 * when it has more than one argument — only the secondary is given one — from `fromMs` to
 * `toMs` after its first turn (wall clock, the start kept at 200: the secondary's checkpoints
 * hold the primary's start). A trap only the secondary takes, for a while.
 */
function divergingTrapGuest(t: { after(fn: () => unknown): void }, fromMs: number, toMs: number): string {
  const ns = (ms: number): string => String(BigInt(ms) * 1000000n);
  const since = '(i64.sub (i64.load (i32.const 64)) (i64.load (i32.const 200)))';
  return watGuest(t, 'diverging-trap', `(module
    (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
    (import "wasi_snapshot_preview1" "args_sizes_get" (func $argsz (param i32 i32) (result i32)))
    (memory (export "memory") 1)
    (func (export "_start")
      (loop $turn
        (drop (call $clock (i32.const 0) (i64.const 0) (i32.const 64)))
        (if (i64.eqz (i64.load (i32.const 200))) (then (i64.store (i32.const 200) (i64.load (i32.const 64)))))
        (drop (call $argsz (i32.const 80) (i32.const 84)))
        (if (i32.and (i32.ge_u (i32.load (i32.const 80)) (i32.const 2))
              (i32.and (i64.ge_u ${since} (i64.const ${ns(fromMs)})) (i64.lt_u ${since} (i64.const ${ns(toMs)}))))
          (then unreachable))
        (i32.store (i32.const 96) (i32.add (i32.load (i32.const 96)) (i32.const 1)))
        (br $turn))))`);
}

test('colo: a guest crash only the secondary takes is replaced by a checkpoint at once, not after x-checkpoint-delay; the secondary can then take over', async (t) => {
  const env = new TestEnv(t);
  const guest = divergingTrapGuest(t, 1500, 1800);
  // -S: the guest's first turn is at COLO start on both nodes, so the secondary is in COLO when it traps.
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest, args: ['-S'] }),
    env.startVm({ name: 'dst', guest, args: ['--incoming', 'defer'], guestArgs: ['diverge'] }),
  ]);
  // A periodic checkpoint would come only after a minute: the one that replaces the crashed SVM is asked for.
  await Promise.all([src.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': 60000 }), dst.setMigration({ 'x-colo': true })]);
  const port = await dst.listenIncoming();
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  await src.waitMigrationStatus('colo', 30000);
  const panicked = await dst.waitEvent('GUEST_PANICKED', { timeoutMs: 20000 });
  assert.deepEqual(panicked.data, { action: 'pause', info: { type: 'wasm-trap', message: 'unreachable' } });
  const turns = async (vm: typeof src): Promise<number> => (await vm.pmem(96, 4)).readUInt32LE(0);
  await waitFor('the secondary to run again after its guest crashed (a checkpoint replacing it)', async () => (await dst.status()) === 'running' && (await sleep(500), (await dst.status()) === 'running'), 15000, 100);
  const before = await turns(dst);
  await waitFor('the secondary\'s guest to turn on', async () => (await turns(dst)) > before, 10000, 50);
  const counters = ((await src.qmp.execute('query-migrate')) as { 'x-colo': Record<string, number> })['x-colo'];
  assert.ok(counters['checkpoints-resync']! >= 1 && counters['checkpoints-periodic'] === 0, `resync checkpoints replaced the crashed SVM (${JSON.stringify(counters)})`);
  assert.equal(await src.migrationStatus(), 'colo', 'the pair stays in COLO');
  assert.deepEqual(await dst.qmp.execute('query-colo-status'), { mode: 'secondary', 'last-mode': 'secondary', reason: 'none' });
  // Said once at warn however many times it crashed; no error line on either node.
  const warns = dst.stderr.split('\n').filter((l) => / warn .*the SVM's guest crashed/.test(l));
  assert.equal(warns.length, 1, dst.stderr);
  assertNoErrors(src, dst);
  // The secondary holds the primary's state again: it takes over and runs.
  const mark = dst.qmp.eventCount;
  await dst.yankMigration();
  await dst.qmp.execute('x-colo-lost-heartbeat');
  assert.deepEqual((await dst.waitEvent('COLO_EXIT', { after: mark, timeoutMs: 10000 })).data, { mode: 'secondary', reason: 'request' });
  assert.equal(await dst.status(), 'running');
  const after = await turns(dst);
  await waitFor('the survivor\'s guest to turn on', async () => (await turns(dst)) > after, 10000, 50);
  await src.stop();
  assertNoErrors(src, dst);
});

/**
 * A memwalk pair (64M, `walk` walked) in COLO at `delayMs`: the primary in status colo, the
 * secondary resumed (its first RESUME), the primary's guest past two rounds before the migrate.
 */
async function memwalkPairInColo(env: TestEnv, delayMs: number, walk = '4M'): Promise<[TestVm, TestVm]> {
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '64M'], guestArgs: [walk] }),
    env.startVm({ name: 'dst', guest: guests.memwalk, args: ['--memory', '64M', '--incoming', 'defer'], guestArgs: [walk] }),
  ]);
  await Promise.all([src.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': delayMs }), dst.setMigration({ 'x-colo': true })]);
  await src.waitSerial('B', { count: 2 });
  const port = await dst.listenIncoming();
  await src.migrateIntoColo(dst, port);
  return [src, dst];
}

test('colo: a primary the user stopped stays stopped when it goes on alone after its link broke (fencing); cont runs it', async (t) => {
  const env = new TestEnv(t);
  const [src, dst] = await memwalkPairInColo(env, 60000);
  await waitFor('the primary to run in COLO', async () => (await src.status()) === 'running', 10000);
  // The operator stops the primary, then the secondary goes away: the primary's link breaks and,
  // after its grace period, it leaves COLO by itself (reason error).
  await src.qmp.execute('stop');
  const mark = src.qmp.eventCount;
  dst.child.kill('SIGKILL');
  assert.deepEqual((await src.waitEvent('COLO_EXIT', { after: mark, timeoutMs: 15000 })).data, { mode: 'primary', reason: 'error' });
  // Before, the failover ran the VM again.
  assert.equal(await src.status(), 'paused', 'the user\'s stop holds');
  await assertStill(src, 300);
  await src.qmp.execute('cont');
  assert.equal(await src.status(), 'running');
  await assertAdvancing(src, 1);
  assertNoErrors(src);
});

test('colo: stop and then cont on either node in COLO run the VM again at once, as QEMU\'s (not only at the next checkpoint); the pair stays in COLO', async (t) => {
  const env = new TestEnv(t);
  // The first periodic checkpoint comes after a minute: a cont refused now would leave the VM stopped that long.
  const [src, dst] = await memwalkPairInColo(env, 60000);
  await waitFor('the primary to run in COLO', async () => (await src.status()) === 'running', 10000);
  for (const vm of [src, dst]) {
    await vm.qmp.execute('stop');
    assert.equal(await vm.status(), 'paused', `${vm.spec.name}: stop pauses it`);
    await assertStill(vm, 300);
    await vm.qmp.execute('cont');
    assert.equal(await vm.status(), 'running', `${vm.spec.name}: cont runs it again`);
    await assertAdvancing(vm, 1);
  }
  for (const vm of [src, dst]) assert.equal(await vm.migrationStatus(), 'colo', `${vm.spec.name} stays in COLO`);
  // The checkpoints go on with both running.
  const before = ((await src.qmp.execute('query-migrate')) as { 'x-colo': Record<string, number> })['x-colo'].checkpoints!;
  await src.qmp.execute('migrate-set-parameters', { 'x-checkpoint-delay': 200 });
  await waitFor('two more checkpoints', async () => ((await src.qmp.execute('query-migrate')) as { 'x-colo': Record<string, number> })['x-colo'].checkpoints! >= before + 2, 15000);
  await Promise.all([assertAdvancing(src, 1), assertAdvancing(dst, 1)]);
  assertNoErrors(src, dst);
});

test('colo: migrate_cancel on the primary in COLO is refused with the way out, not answered {} while COLO goes on; on the secondary it changes nothing, as QEMU', async (t) => {
  const env = new TestEnv(t);
  const [src, dst] = await memwalkPairInColo(env, 200);
  // A script that cancels and then waits for status cancelled must learn at once that it will not come.
  await assert.rejects(src.qmp.execute('migrate_cancel'), /COLO.*x-colo-lost-heartbeat/);
  await assert.rejects(src.qmp.execute('migrate-cancel'), /COLO.*x-colo-lost-heartbeat/);
  // QEMU's migrate_cancel acts on the outgoing migration only: the secondary has none.
  assert.deepEqual(await dst.qmp.execute('migrate_cancel'), {});
  const checkpoints = async (): Promise<number> => ((await src.qmp.execute('query-migrate')) as { 'x-colo': Record<string, number> })['x-colo'].checkpoints!;
  const before = await checkpoints();
  await waitFor('two more checkpoints after the refused cancel', async () => (await checkpoints()) >= before + 2, 15000);
  for (const vm of [src, dst]) assert.equal(await vm.migrationStatus(), 'colo', `${vm.spec.name} stays in COLO`);
  assert.deepEqual(src.eventsOf('MIGRATION').map((e) => e.data?.status).filter((s) => s === 'cancelling' || s === 'cancelled'), []);
  assertNoErrors(src, dst);
});

test("colo: the secondary's query-status says colo, as QEMU's, all through a checkpoint (its apply too): never paused, which a manager would take for a stop to undo", async (t) => {
  const env = new TestEnv(t);
  const [src, dst] = await memwalkPairInColo(env, 100, '8M');
  // Every 8 MiB checkpoint's apply copies the walk into guest RAM: sampled through ten of them.
  const seen = new Map<string, number>();
  const mark = dst.qmp.eventCount;
  await waitFor('ten checkpoints applied on the secondary', async () => {
    const s = await dst.qmp.execute<{ status: string; running: boolean }>('query-status');
    const key = `${s.status}/${s.running}`;
    seen.set(key, (seen.get(key) ?? 0) + 1);
    return dst.eventsOf('RESUME', mark).length >= 10;
  }, 60000, 2);
  const states = [...seen.keys()].sort();
  assert.ok(states.every((k) => k === 'running/true' || k === 'colo/false'), `the secondary's run states in COLO: ${JSON.stringify([...seen])}`);
  assert.ok(seen.has('colo/false'), `a checkpoint was seen (${JSON.stringify([...seen])})`);
  assertNoErrors(src, dst);
});

test('colo: quit on the secondary in the middle of its checkpoints ends it quietly: no error that it lost its copy of the primary, no wait for x-colo-lost-heartbeat, no COLO_EXIT', async (t) => {
  // Back-to-back checkpoints (x-checkpoint-delay 0) of an 8 MiB walk: the quit lands in a pause
  // or an apply, which the exit's destroyed machine fails.
  for (let round = 0; round < 2; round++) {
    const env = new TestEnv(t);
    const [src, dst] = await memwalkPairInColo(env, 0, '8M');
    for (let i = 0; i < 2 + round; i++) await dst.waitEvent('STOP', { after: dst.qmp.eventCount, timeoutMs: 15000 });
    const mark = dst.qmp.eventCount;
    assert.deepEqual(await dst.qmp.execute('quit'), {});
    assert.equal(await dst.waitExit(10000), 0, 'the secondary exits with status 0');
    const said = dst.stderr.split('\n').filter((l) => / (warn|error) /.test(l) || /x-colo-lost-heartbeat/.test(l));
    assert.deepEqual(said, [], `round ${round}: the quitting secondary said:\n${dst.stderr}`);
    assert.deepEqual(dst.eventsOf('COLO_EXIT', mark), [], 'no COLO_EXIT from a secondary that quits');
    // The primary sees its secondary gone and goes on alone, as after any loss of the link.
    assert.deepEqual((await src.waitEvent('COLO_EXIT', { timeoutMs: 10000 })).data, { mode: 'primary', reason: 'error' });
    await assertAdvancing(src, 1);
    await env.cleanup();
  }
});
