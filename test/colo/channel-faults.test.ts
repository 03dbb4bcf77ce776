/**
 * One connection of a COLO pair fails while the others live (a proxy in front of the
 * secondary carries them all): a multifd channel reset between checkpoints or inside one,
 * stalled so that its round's barrier never passes, or corrupted; the SVM output channel closed
 * alone; the main channel closed alone. The primary must serve on (after its grace), the
 * secondary must never hold a half-applied checkpoint, every wait must end, and the primary can
 * be protected again afterwards.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { TestEnv, freePort, guests, memwalkRegion, sleep, startKvSourceAndTarget, waitFor, type VmProcess } from '../framework/harness.js';
import { RespClient } from '../framework/resp.js';
import { ChannelProxy } from '../framework/channel-proxy.js';
import { assertAdvancing, assertNoErrors } from '../migration/helpers.js';
import { limits } from '../../src/core/limits.js';
import { linkLossGraceMs } from '../../src/colo/driver.js';

const channels = 4;
const caps = { 'x-colo': true, multifd: true };

/** Threads of a process (main, vCPU, multifd workers, libuv's pool, V8's). */
function threads(vm: VmProcess): number {
  return fs.readdirSync(`/proc/${vm.child.pid}/task`).length;
}

async function protectedPair(env: TestEnv): Promise<{ src: VmProcess; dst: VmProcess; proxy: ChannelProxy; region: { start: number; size: number } }> {
  const common = ['--memory', '32M'];
  const guestArgs = ['4M'];
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.memwalk, args: common, guestArgs }),
    env.startVm({ name: 'dst', guest: guests.memwalk, args: [...common, '--incoming', 'defer'], guestArgs }),
  ]);
  await Promise.all([src.setMigration(caps, { 'multifd-channels': channels, 'x-checkpoint-delay': 100 }), dst.setMigration(caps, { 'multifd-channels': channels })]);
  await src.waitSerial('B', { count: 2 });
  const region = memwalkRegion(src.serial());
  assert.ok(region, 'memwalk printed its region');
  const proxy = await ChannelProxy.start(await dst.listenIncoming());
  env.onCleanup(() => proxy.close());
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${proxy.port}` });
  await src.waitMigrationStatus('colo', 30000);
  await dst.waitEvent('RESUME', { nth: 3, timeoutMs: 15000 });
  for (let i = 0; i < channels; i++) await proxy.established(`multifd${i}`);
  return { src, dst, proxy, region };
}

/**
 * protectedPair, with its primary's thread count in COLO and the event counts of both nodes
 * now, once the secondary's next `event` has come (RESUME: between checkpoints; STOP: inside one).
 */
async function pairBeforeFault(env: TestEnv, event: 'RESUME' | 'STOP' = 'RESUME'): Promise<Awaited<ReturnType<typeof protectedPair>> & { coloThreads: number; marks: { src: number; dst: number } }> {
  const pair = await protectedPair(env);
  const { src, dst } = pair;
  const coloThreads = threads(src);
  const marks = { src: src.qmp.eventCount, dst: dst.qmp.eventCount };
  await dst.waitEvent(event, { after: marks.dst, timeoutMs: 10000 });
  return { ...pair, coloThreads, marks };
}

/**
 * After the fault the primary has left COLO by itself and serves on; the secondary, told to take
 * over, holds the last whole checkpoint (the memwalk pattern); the primary's multifd workers are
 * gone; and the primary can be protected again by a new secondary.
 */
async function survivesAndReprotects(env: TestEnv, pair: { src: VmProcess; dst: VmProcess; region: { start: number; size: number } }, marks: { src: number; dst: number }, coloThreads: number): Promise<void> {
  const { src, dst, region } = pair;
  await assertAdvancing(src, 2);
  assert.equal(await src.status(), 'running');
  // The multifd senders ended with COLO (a failover leaves no worker thread behind).
  await waitFor(`the primary's ${channels} multifd workers to end (threads ${threads(src)}, ${coloThreads} in COLO)`, () => threads(src) <= coloThreads - channels, 10000);
  const mark = dst.qmp.eventCount;
  await dst.qmp.execute('x-colo-lost-heartbeat');
  assert.deepEqual((await dst.waitEvent('COLO_EXIT', { after: mark, timeoutMs: 10000 })).data, { mode: 'secondary', reason: 'request' });
  assert.equal(await dst.memwalkCheck(region), null, 'the secondary holds a whole checkpoint: nothing of the broken one reached its RAM');
  assert.equal(dst.eventsOf('COLO_EXIT', marks.dst).length, 1, 'the secondary left COLO only when told');
  await dst.stop();
  // Protected again by a new secondary, straight (no proxy).
  const dst2 = await env.startVm({ name: 'dst2', guest: guests.memwalk, args: ['--memory', '32M', '--incoming', 'defer'], guestArgs: ['4M'] });
  await dst2.setMigration(caps, { 'multifd-channels': channels });
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${await dst2.listenIncoming()}` });
  await src.waitMigrationStatus('colo', 30000);
  await dst2.waitEvent('RESUME', { nth: 3, timeoutMs: 15000 });
  await Promise.all([assertAdvancing(src, 1), assertAdvancing(dst2, 1)]);
  const m2 = dst2.qmp.eventCount;
  await dst2.yankMigration();
  await dst2.qmp.execute('x-colo-lost-heartbeat');
  await dst2.waitEvent('COLO_EXIT', { after: m2, timeoutMs: 10000 });
  assert.equal(await dst2.memwalkCheck(region), null, 'the new secondary holds the primary\'s memory');
}

for (const link of ['multifd1', 'main'] as const) {
  test(`colo/channel: the ${link} channel stalls (no byte forwarded, the connection kept): the checkpoint is given up within its bound and the primary serves on alone, then is protected again`, async (t) => {
    const env = new TestEnv(t);
    const pair = await pairBeforeFault(env);
    const { src, dst, proxy, coloThreads, marks } = pair;
    proxy.stall(link);
    const stalledAt = performance.now();
    // Before the bound, the stalled checkpoint held the pair (and the clients' output) for good.
    const exit = await src.waitEvent('COLO_EXIT', { after: marks.src, timeoutMs: limits.coloCheckpointStallMs + linkLossGraceMs + 10000 });
    assert.deepEqual(exit.data, { mode: 'primary', reason: 'error' });
    const tookMs = performance.now() - stalledAt;
    assert.ok(tookMs >= limits.coloCheckpointStallMs - 1000, `not given up before the bound (${Math.round(tookMs)} ms)`);
    assert.match(src.stderr, / warn colo: primary: nothing moved between the nodes for \d+ ms while a checkpoint waited/);
    assert.equal(await src.migrationStatus(), 'completed');
    await survivesAndReprotects(env, pair, marks, coloThreads);
    assertNoErrors(src, dst);
  });
}

for (const link of ['multifd0', 'main'] as const) {
  test(`colo/channel: one byte flipped on the ${link} channel: the secondary names the corruption as an error and closes the link; the primary serves on alone`, async (t) => {
    const env = new TestEnv(t);
    const pair = await pairBeforeFault(env);
    const { src, dst, proxy, coloThreads, marks } = pair;
    proxy.corrupt(link);
    const exit = await src.waitEvent('COLO_EXIT', { after: marks.src, timeoutMs: linkLossGraceMs + 10000 });
    assert.deepEqual(exit.data, { mode: 'primary', reason: 'error' });
    // A damaged stream is a fault, not a connection that closed: one error line, with its code.
    const lines = dst.errorLines();
    assert.equal(lines.length, 1, `one error line on the secondary:\n${dst.stderr}`);
    assert.match(lines[0]!, /COLO stream from the primary is broken \(.*checksum mismatch.*\[FRAME_CHECKSUM\]\)/);
    assert.doesNotMatch(dst.stderr, /COLO channel closed/, 'not reported as a closed channel');
    await survivesAndReprotects(env, pair, marks, coloThreads);
    assertNoErrors(src);
  });
}

for (const when of ['between', 'inside'] as const) {
  test(`colo/channel: one multifd channel reset ${when} checkpoints: the primary serves on alone after its grace, the secondary applied nothing of a cut checkpoint`, async (t) => {
    const env = new TestEnv(t);
    const pair = await pairBeforeFault(env, when === 'inside' ? 'STOP' : 'RESUME');
    const { src, dst, proxy, coloThreads, marks } = pair;
    proxy.reset('multifd2');
    const exit = await src.waitEvent('COLO_EXIT', { after: marks.src, timeoutMs: linkLossGraceMs + 10000 });
    assert.deepEqual(exit.data, { mode: 'primary', reason: 'error' });
    assert.match(src.stderr, / info colo: COLO channel closed \(multifd channel 2/);
    assert.match(dst.stderr, / info colo: COLO channel closed \(/);
    await survivesAndReprotects(env, pair, marks, coloThreads);
    assertNoErrors(src, dst);
  });
}

/**
 * A kv pair in COLO through a ChannelProxy, at `checkpointDelayMs`, written to (SET k0 v0, …)
 * until SVM output and the mirror both go on the output channel; `sets`: how many SETs that
 * took (k0 … k(sets-1) hold v0 …); `port`: the service address's.
 */
async function kvPairOnOutputChannel(env: TestEnv, checkpointDelayMs: number): Promise<{ src: VmProcess; dst: VmProcess; proxy: ChannelProxy; client: RespClient; counters: () => Promise<Record<string, unknown>>; sets: number; port: number }> {
  const port = await freePort();
  const common = ['--memory', '64M', '--net', `listen=127.0.0.1:${port}`];
  const [src, dst] = await startKvSourceAndTarget(env, common);
  await Promise.all([src.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': checkpointDelayMs }), dst.setMigration({ 'x-colo': true })]);
  await src.waitSerial('kv ready');
  const proxy = await ChannelProxy.start(await dst.listenIncoming());
  env.onCleanup(() => proxy.close());
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${proxy.port}` });
  await src.waitMigrationStatus('colo', 30000);
  const client = await RespClient.connect(port);
  env.onCleanup(() => client.close());
  const counters = async (): Promise<Record<string, unknown>> => ((await src.qmp.execute('query-migrate')) as { 'x-colo': Record<string, unknown> })['x-colo'];
  let sets = 0;
  await waitFor('SVM output and the mirror on the output channel', async () => {
    assert.equal(await client.command(['SET', `k${sets}`, `v${sets}`], 10000), 'OK');
    sets++;
    const x = await counters();
    return x['svm-output-channel'] === 'direct' && x['mirror-channel'] === 'direct';
  }, 20000, 0);
  await proxy.established('output');
  return { src, dst, proxy, client, counters, sets, port };
}

type OutputChannelPair = Awaited<ReturnType<typeof kvPairOnOutputChannel>>;

/**
 * Sequential SETs from key `i` on (each one the stalled channel holds waits for a timeout
 * checkpoint) until the primary moves `channel` back to the main channel, for `forMs` at most:
 * it must, within a few timeout checkpoints after `atStall` (the first of them sets the mark).
 * The counters then, and the next key.
 */
async function setsUntilGivenUp(
  pair: OutputChannelPair,
  i: number,
  atStall: Record<string, unknown>,
  o: { channel: 'svm-output-channel' | 'mirror-channel'; what: string; forMs: number; commandTimeoutMs: number },
): Promise<{ x: Record<string, unknown>; i: number }> {
  const stalledAt = performance.now();
  while (performance.now() - stalledAt < o.forMs) {
    assert.equal(await pair.client.command(['SET', `k${i}`, `v${i}`], o.commandTimeoutMs), 'OK');
    i++;
    if ((await pair.counters())[o.channel] === 'main') break;
  }
  const tookMs = performance.now() - stalledAt;
  const x = await pair.counters();
  assert.equal(x[o.channel], 'main', `the primary gave ${o.what} up (after ${Math.round(tookMs)} ms, ${JSON.stringify(x)})`);
  const timeouts = (x['checkpoints-timeout'] as number) - (atStall['checkpoints-timeout'] as number);
  assert.ok(timeouts <= limits.coloOutputChannelSilentTimeouts + 2, `given up after ${timeouts} timeout checkpoints, ${Math.round(tookMs)} ms`);
  return { x, i };
}

/**
 * 100 sequential SETs from key `i` on, after the give-up: served at the speed of the main
 * channel again, not one request per timeout checkpoint. The counters after them, and the next key.
 */
async function servedFastAgain(pair: OutputChannelPair, i: number): Promise<{ after: Record<string, unknown>; i: number }> {
  const before = await pair.counters();
  const t0 = performance.now();
  for (let k = 0; k < 100; k++, i++) assert.equal(await pair.client.command(['SET', `k${i}`, `v${i}`], 10000), 'OK');
  const meanMs = (performance.now() - t0) / 100;
  const after = await pair.counters();
  assert.ok(meanMs < 50, `requests after the give-up take ${meanMs.toFixed(1)} ms each`);
  assert.ok((after['checkpoints-timeout'] as number) - (before['checkpoints-timeout'] as number) <= 1, `no timeout checkpoints after the give-up (${JSON.stringify(before)} → ${JSON.stringify(after)})`);
  return { after, i };
}

/** Nothing lost: the first, middle and last of the `n` keys set hold their values. */
async function assertValuesKept(client: RespClient, n: number): Promise<void> {
  for (const k of [0, Math.floor(n / 2), n - 1]) assert.equal(await client.command(['GET', `k${k}`], 10000), `v${k}`);
}

test('colo/channel: the SVM output channel stalls (open, forwarding nothing): the primary notices within a few compare timeouts, both sides go back to the main channel, and requests are fast again', async (t) => {
  const env = new TestEnv(t);
  // Periodic checkpoints far apart: a request that waits for one shows.
  const pair = await kvPairOnOutputChannel(env, 5000);
  const { src, dst, proxy, client, counters } = pair;
  const atStall = await counters();
  proxy.stall('output');
  const stalled = await setsUntilGivenUp(pair, pair.sets, atStall, { channel: 'svm-output-channel', what: 'the stalled output channel', forMs: 8000, commandTimeoutMs: 10000 });
  const x = stalled.x;
  assert.equal(x['mirror-channel'], 'main');
  assert.equal(x['svm-output-channel-stalls'], 1, JSON.stringify(x));
  assert.equal(src.stderr.match(/ warn colo: the SVM output channel delivered nothing/g)?.length, 1, src.stderr);
  await waitFor('the secondary to take its output off the channel', () => / info colo: the primary gave the SVM output channel up/.test(dst.stderr), 5000);
  const { after, i } = await servedFastAgain(pair, stalled.i);
  assert.equal((after['checkpoints-resync'] as number) - (atStall['checkpoints-resync'] as number), 1, `one resync checkpoint makes good what the channel lost (${JSON.stringify(after)})`);
  await assertValuesKept(client, i);
  assert.equal(await src.migrationStatus(), 'colo');
  assertNoErrors(src, dst);
});

test('colo/channel: only the mirror direction of the output channel stalls (primary → secondary forwards nothing, SVM output still flows back): the primary notices within a few compare timeouts, the mirror goes back to the main channel, and requests are fast again', async (t) => {
  const env = new TestEnv(t);
  // Periodic checkpoints far apart: a request that waits for one shows.
  const pair = await kvPairOnOutputChannel(env, 5000);
  const { src, dst, proxy, client, counters } = pair;
  const atStall = await counters();
  proxy.stall('output', 'down');
  // Each request whose mirror the stalled direction holds waits for a timeout checkpoint.
  const stalled = await setsUntilGivenUp(pair, pair.sets, atStall, { channel: 'mirror-channel', what: 'the stalled mirror direction', forMs: 20000, commandTimeoutMs: 15000 });
  const { i } = await servedFastAgain(pair, stalled.i);
  await assertValuesKept(client, i);
  assert.equal(await src.migrationStatus(), 'colo');
  assertNoErrors(src, dst);
});

/**
 * 96 pipelined SETs of one key ('bulk'), 512 KiB each, on a connection of their own: far more
 * than coloMirrorUnsentBytesMax plus what the kernel buffers. `allAnswered` waits (60 s) for
 * every +OK, `onTimeout` first on a timeout.
 */
async function bulkSets(env: TestEnv, port: number): Promise<{ valueBytes: number; allAnswered: (onTimeout: () => Promise<void>) => Promise<void> }> {
  const valueBytes = 512 * 1024;
  const requests = 96;
  const bulk = net.connect({ host: '127.0.0.1', port });
  env.onCleanup(() => void bulk.destroy());
  let replies = '';
  bulk.on('data', (c: Buffer) => (replies += c.toString('latin1')));
  bulk.on('error', () => undefined);
  await new Promise<void>((resolve, reject) => {
    bulk.once('connect', resolve);
    bulk.once('error', reject);
  });
  const req = `*3\r\n$3\r\nSET\r\n$4\r\nbulk\r\n$${valueBytes}\r\n${'x'.repeat(valueBytes)}\r\n`;
  for (let k = 0; k < requests; k++) bulk.write(req);
  const answered = (): number => replies.split('+OK\r\n').length - 1;
  return {
    valueBytes,
    allAnswered: (onTimeout) =>
      waitFor(`every bulk SET to be answered (${answered()} of ${requests} so far)`, () => answered() === requests, 60000).then(
        () => undefined,
        async (err: unknown) => {
          await onTimeout();
          throw err;
        },
      ),
  };
}

test('colo/channel: only the mirror direction of the output channel stalls under bulk input (more than coloMirrorUnsentBytesMax queued): the clients are not held for good; the mirror goes back to the main channel and every request is answered', async (t) => {
  const env = new TestEnv(t);
  const { src, dst, proxy, client, counters, sets, port } = await kvPairOnOutputChannel(env, 1000);
  let i = sets;
  proxy.stall('output', 'down');
  // Pipelined SETs of one key, far more than the mirror's bound plus what the kernel buffers.
  const bulk = await bulkSets(env, port);
  await bulk.allAnswered(async () => t.diagnostic(JSON.stringify(await counters())));
  const x = await counters();
  assert.equal(x['mirror-channel'], 'main', JSON.stringify(x));
  assert.equal(x['svm-output-channel-stalls'], 1, JSON.stringify(x));
  assert.ok((x['checkpoints-resync'] as number) >= 1, `a resync checkpoint makes good what the channel kept (${JSON.stringify(x)})`);
  assert.equal(src.stderr.match(/ warn colo: the secondary took no byte of the \d+ bytes of mirrored input/g)?.length, 1, src.stderr);
  // The hold ends because the mirror left the channel, not because the secondary took its input.
  const afterGiveUp = src.stderr.slice(src.stderr.search(/ warn colo: the secondary took no byte/));
  assert.match(afterGiveUp.match(/ info colo: .*clients are read again/)?.[0] ?? '', /the mirror moved to the main channel \(the SVM output channel is gone\)/, src.stderr);
  assert.equal(await client.command(['STRLEN', 'bulk'], 10000), bulk.valueBytes);
  assert.equal(await client.command(['GET', `k${i - 1}`], 10000), `v${i - 1}`);
  assert.equal(await src.migrationStatus(), 'colo');
  assertNoErrors(src, dst);
});

test('colo/channel: a checkpoint that takes longer than coloMirrorChannelStuckMs while bulk input is held on the output channel does not give the channel up: the SVM, paused for the checkpoint, does not read it, and the path is healthy', async (t) => {
  const env = new TestEnv(t);
  const { src, dst, proxy, counters, port } = await kvPairOnOutputChannel(env, 1000);
  // The secondary's answers on the main channel are slow for a while (a congested path back):
  // the next checkpoint's CHECKPOINT_REPLY waits, the SVM stays paused for it, and the PVM runs on.
  // Between checkpoints (the last one's VMSTATE_LOADED through), so the next one is held.
  await dst.waitEvent('RESUME', { after: dst.qmp.eventCount, timeoutMs: 10000 });
  await sleep(100);
  const mark = dst.qmp.eventCount;
  const release = proxy.hold('main', 'up');
  let released = false;
  env.onCleanup(() => {
    if (!released) release();
  });
  const stop = await dst.waitEvent('STOP', { after: mark, timeoutMs: 10000 });
  const pausedAt = performance.now();
  assert.ok(stop, 'the SVM paused for the checkpoint');
  // Bulk input meanwhile, far more than coloMirrorUnsentBytesMax: the mirror on the output channel is held.
  const bulk = await bulkSets(env, port);
  await waitFor('the mirror on the output channel to be held', () => / info colo: the secondary has \d+ bytes of mirrored input unread/.test(src.stderr), 5000).catch(async (err: unknown) => {
    t.diagnostic(JSON.stringify(await counters()));
    t.diagnostic(src.stderr.slice(-3000));
    t.diagnostic(dst.stderr.slice(-3000));
    throw err;
  });
  // Longer than coloMirrorChannelStuckMs, shorter than coloCheckpointStallMs (which would fail the checkpoint over).
  assert.ok(limits.coloMirrorChannelStuckMs + 2000 < limits.coloCheckpointStallMs);
  await sleep(Math.max(0, pausedAt + limits.coloMirrorChannelStuckMs + 2000 - performance.now()));
  released = true;
  release();
  await bulk.allAnswered(async () => t.diagnostic(JSON.stringify(await counters())));
  const x = await counters();
  assert.equal(x['svm-output-channel-stalls'], 0, `the healthy output channel was given up (${JSON.stringify(x)})`);
  assert.equal(x['mirror-channel'], 'direct', JSON.stringify(x));
  assert.doesNotMatch(src.stderr, / warn colo: the secondary took no byte/);
  assert.equal(await src.migrationStatus(), 'colo');
  assertNoErrors(src, dst);
});
