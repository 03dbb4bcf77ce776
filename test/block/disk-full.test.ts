/**
 * A full host filesystem under a running guest is QEMU's werror=enospc: the guest stops inside
 * the write that failed (state io-error, BLOCK_IO_ERROR), keeps its clients, and the write is
 * tried again every limits.diskFullRetryMs or at `cont`, so once there is room it goes through
 * and nothing is lost. Before, kv.wasm saw ENOSPC and stopped for good.
 *
 * The drive is a sparse 16 MiB image on a 2 MiB tmpfs the test mounts (it runs as root, as CI
 * does), next to a 1 MiB filler file that the test deletes to make room. The COLO cases put
 * the primary's or the secondary's image there.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { TestEnv, type VmProcess, coloBin, freePort, guests, sleep, waitFor } from '../framework/harness.js';
import { AckedWriter, RespClient, countMissing } from '../framework/resp.js';
import { limits } from '../../src/core/limits.js';
import { Supervisor, pidAlive, pidsUsing, startProtectedPair } from '../framework/up.js';

/** A pair of kv.wasm in COLO (x-checkpoint-delay `delayMs`), each on its own drive image. */
async function coloPair(env: TestEnv, pvmDrive: string, svmDrive: string, opts: { delayMs: number; svmEnv?: Record<string, string> }): Promise<{ pvm: VmProcess; svm: VmProcess; port: number }> {
  const port = await freePort();
  const common = ['--memory', '64M', '--net', `listen=127.0.0.1:${port}`];
  const [pvm, svm] = await Promise.all([
    env.startVm({ name: 'pvm', guest: guests.kv, args: [...common, '--drive', `file=${pvmDrive}`] }),
    env.startVm({ name: 'svm', guest: guests.kv, args: [...common, '--drive', `file=${svmDrive}`, '--incoming', 'defer'], ...(opts.svmEnv === undefined ? {} : { env: opts.svmEnv }) }),
  ]);
  await Promise.all([pvm.setMigration({ 'x-colo': true }, { 'x-checkpoint-delay': opts.delayMs }), svm.setMigration({ 'x-colo': true })]);
  await pvm.waitSerial('kv ready');
  const migPort = await svm.listenIncoming();
  await pvm.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  await pvm.waitMigrationStatus('colo', 30000);
  return { pvm, svm, port };
}

/**
 * A sparse 16 MiB image on a 2 MiB tmpfs, next to a 1 MiB filler: about a megabyte of guest
 * writes fills the filesystem; deleting the filler makes room again.
 */
async function imageOnSmallFs(env: TestEnv, name: string): Promise<{ image: string; filler: string }> {
  const mnt = await env.tmpfs('small-fs', '2m');
  const image = path.join(mnt, name);
  fs.closeSync(fs.openSync(image, 'w'));
  fs.truncateSync(image, 16 * 1024 * 1024); // sparse: blocks are allocated as the guest writes them
  const filler = path.join(mnt, 'filler');
  fs.writeFileSync(filler, Buffer.alloc(1024 * 1024, 1));
  return { image, filler };
}

test('a full host filesystem stops the guest in its write (io-error); with room again it runs on and loses nothing', async (t) => {
  const env = new TestEnv(t);
  const { image, filler } = await imageOnSmallFs(env, 'kv.img');

  const port = await freePort();
  const args = ['--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`, '--memory', '64M'];
  const vm = await env.startVm({ name: 'kv', guest: guests.kv, args });
  await vm.waitSerial('kv ready');
  const mark = vm.qmp.eventCount;

  // 2000-byte values: the free megabyte is gone after about 500 acknowledged writes.
  const writer = await AckedWriter.start(port, 'full:', (i) => `${i}:`.padEnd(2000, 'x'));
  env.onCleanup(() => writer.stop());
  const other = await RespClient.connect(port);
  env.onCleanup(() => other.close());
  await waitFor('the VM to stop in io-error', async () => (await vm.status()) === 'io-error', 30000);
  const ev = await vm.waitEvent('BLOCK_IO_ERROR', { after: mark, timeoutMs: 5000 });
  assert.equal(ev.data?.operation, 'write');
  assert.equal(ev.data?.action, 'stop');
  assert.equal(ev.data?.nospace, true);
  assert.match(String(ev.data?.reason), /ENOSPC|no space/i);
  const st = await vm.qmp.execute('query-status');
  assert.deepEqual(st, { running: false, singlestep: false, status: 'io-error' });
  assert.ok(vm.eventsOf('STOP', mark).length >= 1, 'entering io-error sends STOP');
  const ackedWhenFull = writer.acked.size;
  t.diagnostic(`io-error after ${ackedWhenFull} acknowledged writes`);
  assert.ok(ackedWhenFull > 100, `only ${ackedWhenFull} writes were acknowledged before the disk was full`);

  // Full for longer than a retry: the guest still waits, nothing answered, no client cut off.
  await sleep(limits.diskFullRetryMs * 1.5);
  assert.equal(await vm.status(), 'io-error');
  assert.equal(writer.acked.size, ackedWhenFull, 'no write is acknowledged while the disk is full');

  // stop / cont as in QEMU: paused, then cont tries the write again at once — still no room.
  await vm.qmp.execute('stop');
  assert.equal(await vm.status(), 'paused');
  const contMark = vm.qmp.eventCount;
  await vm.qmp.execute('cont');
  await vm.waitEvent('BLOCK_IO_ERROR', { after: contMark, timeoutMs: 5000 });
  assert.equal(await vm.status(), 'io-error');

  // Room again: the waiting write goes through at its next try, the guest runs on.
  const freedAt = Date.now();
  fs.rmSync(filler);
  await waitFor('the VM to run again after room was made', async () => (await vm.status()) === 'running', limits.diskFullRetryMs + 5000);
  t.diagnostic(`running again ${Date.now() - freedAt} ms after room was made`);
  await waitFor('100 more acknowledged writes', () => writer.acked.size >= ackedWhenFull + 100, 20000);
  assert.equal(await other.command(['PING']), 'PONG', 'a client connected during io-error is still served');
  await writer.stop();
  const acked = new Map(writer.acked);
  assert.deepEqual(vm.errorLines(), [], 'a full disk is a warning, not an error');
  const warnings = vm.stderr.split('\n').filter((l) => / warn /.test(l));
  assert.equal(warnings.length, 1, `one warning for the whole time the disk was full: ${warnings.join(' | ')}`);
  assert.match(warnings[0]!, /io-error/);

  // Every acknowledged write is on the image: a new VM replays it from the disk.
  await vm.stop();
  const again = await env.startVm({ name: 'kv2', guest: guests.kv, args });
  await again.waitSerial('kv ready');
  const reader = await RespClient.whenServing(port, 'the VM restarted from the image');
  env.onCleanup(() => reader.close());
  const missing = await countMissing(reader, acked);
  assert.equal(missing, 0, `${missing} of ${acked.size} acknowledged writes are not on the image`);
  assert.deepEqual(again.errorLines(), []);
});

test('a VM stopped by a full disk migrates to a host with room: the write it waited in goes through there', async (t) => {
  const env = new TestEnv(t);
  const { image } = await imageOnSmallFs(env, 'kv.img');
  const dstDisk = env.image('dst.img', 16 * 1024 * 1024);

  const port = await freePort();
  const common = ['--net', `listen=127.0.0.1:${port}`, '--memory', '64M'];
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.kv, args: [...common, '--drive', `file=${image}`] }),
    env.startVm({ name: 'dst', guest: guests.kv, args: [...common, '--drive', `file=${dstDisk}`, '--incoming', 'defer'] }),
  ]);
  await src.waitSerial('kv ready');
  const migPort = await dst.listenIncoming();
  const value = (i: number): string => `${i}:`.padEnd(2000, 'y');
  const writer = await AckedWriter.start(port, 'mig:', value);
  env.onCleanup(() => writer.stop());
  await waitFor('the source to stop in io-error', async () => (await src.status()) === 'io-error', 30000);
  const ackedWhenFull = writer.acked.size;

  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  await src.waitMigrationStatus('completed', 60000);
  await dst.waitMigrationStatus('completed', 10000);
  assert.equal(await src.status(), 'postmigrate');
  await writer.ended(); // the switchover resets the connection
  assert.equal(writer.acked.size, ackedWhenFull, 'nothing was acknowledged while the source waited');
  await waitFor('the target to run', async () => (await dst.status()) === 'running', 10000);

  const reader = await RespClient.whenServing(port, 'the target on the service address');
  env.onCleanup(() => reader.close());
  assert.equal(await countMissing(reader, writer.acked), 0, 'every acknowledged write is on the target');
  // The SET the source was stopped in (the writer sends one at a time, in key order) was carried
  // in the machine state and its disk write finished on the target.
  assert.equal(await reader.command(['GET', `mig:${ackedWhenFull}`]), value(ackedWhenFull));
  assert.equal(await reader.command(['SET', 'after', 'move']), 'OK');
  t.diagnostic(`${ackedWhenFull} writes acknowledged before the source's disk was full`);
  assert.deepEqual(src.errorLines(), []);
  assert.deepEqual(dst.errorLines(), []);
  assert.equal(dst.eventsOf('BLOCK_IO_ERROR').length, 0, 'the target had room');
});

test('colo: the primary\'s disk fills up under load; the pair waits, runs on when there is room, and a failover after it loses nothing', async (t) => {
  const env = new TestEnv(t);
  const { image, filler } = await imageOnSmallFs(env, 'pvm.img');
  const svmDisk = env.image('svm.img', 16 * 1024 * 1024);

  const { pvm, svm, port } = await coloPair(env, image, svmDisk, { delayMs: 200 });

  const writer = await AckedWriter.start(port, 'colo-full:', (i) => `${i}:`.padEnd(2000, 'z'));
  env.onCleanup(() => writer.stop());
  await pvm.waitEvent('BLOCK_IO_ERROR', { timeoutMs: 30000 });
  const ackedWhenFull = writer.acked.size;
  t.diagnostic(`the primary's disk was full after ${ackedWhenFull} acknowledged writes`);

  // Full for a while: checkpoints go on, nothing is acknowledged, the client stays connected.
  const mark = svm.qmp.eventCount;
  await svm.waitEvent('RESUME', { after: mark, nth: 3, timeoutMs: 10000 });
  assert.equal(writer.acked.size, ackedWhenFull, 'nothing is acknowledged while the primary cannot write');

  fs.rmSync(filler);
  await waitFor('100 more acknowledged writes once there is room', () => writer.acked.size >= ackedWhenFull + 100, 20000);
  await writer.stop();
  const acked = new Map(writer.acked);
  // A checkpoint that starts after the last acknowledgement and completes: two RESUMEs later.
  const mark2 = svm.qmp.eventCount;
  await svm.waitEvent('RESUME', { after: mark2, nth: 2, timeoutMs: 10000 });
  assert.equal((await pvm.qmp.execute<{ status: string }>('query-migrate')).status, 'colo', 'the pair is still protected');

  const failoverMark = svm.qmp.eventCount;
  pvm.kill('SIGKILL');
  await pvm.waitExit(10000); // so that no client reaches the dying primary's socket
  await svm.qmp.execute('x-colo-lost-heartbeat', {}, { oob: true });
  await svm.waitEvent('COLO_EXIT', { after: failoverMark, timeoutMs: 10000 });
  const reader = await RespClient.whenServing(port, 'the secondary serving on the service address');
  env.onCleanup(() => reader.close());
  const missing = await countMissing(reader, acked);
  assert.equal(missing, 0, `${missing} of ${acked.size} acknowledged writes are missing on the secondary`);
  assert.deepEqual(pvm.errorLines(), []);
  assert.deepEqual(svm.errorLines(), []);
});

test('colo: the secondary\'s disk fills up: it leaves COLO and never takes over; the primary runs on unprotected and loses nothing', async (t) => {
  const env = new TestEnv(t);
  const { image: svmImage } = await imageOnSmallFs(env, 'svm.img');
  const pvmDisk = env.image('pvm.img', 16 * 1024 * 1024);

  const { pvm, svm, port } = await coloPair(env, pvmDisk, svmImage, { delayMs: 200 });
  const [pMark, sMark] = [pvm.qmp.eventCount, svm.qmp.eventCount];

  // The primary's writes reach the secondary's disk in the checkpoints, until it is full.
  const writer = await AckedWriter.start(port, 'svm-full:', (i) => `${i}:`.padEnd(2000, 'w'));
  env.onCleanup(() => writer.stop());
  const sExit = await svm.waitEvent('COLO_EXIT', { after: sMark, timeoutMs: 30000 });
  assert.deepEqual(sExit.data, { mode: 'secondary', reason: 'error' });
  const pExit = await pvm.waitEvent('COLO_EXIT', { after: pMark, timeoutMs: 10000 });
  assert.deepEqual(pExit.data, { mode: 'primary', reason: 'error' });
  const n = writer.acked.size;
  await waitFor('200 more acknowledged writes on the primary alone', () => writer.acked.size >= n + 200, 20000);
  t.diagnostic(`the secondary left COLO after ${n} acknowledged writes`);

  // Its guest is part old checkpoint, part new: it must never serve.
  await assert.rejects(svm.qmp.execute('x-colo-lost-heartbeat', {}, { oob: true }), /not in COLO mode/);
  await assert.rejects(svm.qmp.execute('cont'), /cannot run in state internal-error/);
  assert.equal(await svm.status(), 'internal-error');
  assert.deepEqual(await svm.qmp.execute('query-colo-status'), { mode: 'none', 'last-mode': 'secondary', reason: 'error' });
  assert.equal(await svm.migrationStatus(), 'failed');
  const svmErrors = svm.errorLines();
  assert.equal(svmErrors.length, 1, `one error line on the secondary: ${svmErrors.join(' | ')}`);
  assert.match(svmErrors[0]!, /could not be applied \(cannot store disk block \d+ in .*ENOSPC.*will not take over/);

  await writer.stop();
  const reader = await RespClient.connect(port);
  env.onCleanup(() => reader.close());
  const missing = await countMissing(reader, writer.acked);
  assert.equal(missing, 0, `${missing} of ${writer.acked.size} acknowledged writes are missing on the primary`);
  assert.deepEqual(pvm.errorLines(), []);
});

test('colo: the secondary takes over onto a full disk: it waits in io-error with its writes kept, and once there is room it serves every acknowledged write', async (t) => {
  const env = new TestEnv(t);
  const { image: svmImage, filler } = await imageOnSmallFs(env, 'svm.img');
  const pvmDisk = env.image('pvm.img', 16 * 1024 * 1024);
  // No checkpoint comes before the primary dies: the secondary's writes are all in its layer
  // (in $TMPDIR), and the takeover must write them into its sparse image.
  const { pvm, svm, port } = await coloPair(env, pvmDisk, svmImage, { delayMs: 20000 });
  const writer = await AckedWriter.start(port, 'takeover-full:', (i) => `${i}:`.padEnd(2000, 't'));
  env.onCleanup(() => writer.stop());
  await waitFor('100 acknowledged writes', () => writer.acked.size >= 100, 20000);
  pvm.kill('SIGKILL');
  await pvm.waitExit(10000);
  await writer.ended();
  const acked = new Map(writer.acked);

  // Fill the secondary's filesystem to the last byte.
  const rest = path.join(path.dirname(svmImage), 'rest');
  const fd = fs.openSync(rest, 'w');
  try {
    const chunk = Buffer.alloc(4096, 2);
    for (;;) fs.writeSync(fd, chunk);
  } catch (err) {
    assert.equal((err as NodeJS.ErrnoException).code, 'ENOSPC');
  } finally {
    fs.closeSync(fd);
  }

  const mark = svm.qmp.eventCount;
  await svm.qmp.execute('x-colo-lost-heartbeat', {}, { oob: true });
  const ioError = await svm.waitEvent('BLOCK_IO_ERROR', { after: mark, timeoutMs: 10000 });
  assert.equal(ioError.data.nospace, true);
  assert.equal(await svm.status(), 'io-error');
  // cont cannot run the guest before its disk holds its writes: refused while the failover
  // runs (the migration is still in status colo; the takeover runs the VM itself).
  await assert.rejects(svm.qmp.execute('cont'), /the VM is in a COLO failover, which runs it/);
  assert.equal(await svm.status(), 'io-error', 'cont did not run the guest before its disk commit');
  await sleep(limits.diskFullRetryMs * 2.5);
  assert.equal(await svm.status(), 'io-error', 'it keeps waiting while the disk is full');

  fs.rmSync(filler);
  fs.rmSync(rest);
  const reader = await RespClient.whenServing(port, 'the secondary serving once its writes are on disk');
  env.onCleanup(() => reader.close());
  assert.equal(await countMissing(reader, acked), 0, 'every acknowledged write is on the node that took over');
  assert.equal(await reader.command(['SET', 'after', 'takeover']), 'OK');
  assert.equal(await svm.status(), 'running');
  reader.close();
  await svm.stop();

  // Its image holds them: a fresh kv on it replays them.
  const again = await env.startVm({ name: 'again', guest: guests.kv, args: ['--memory', '64M', '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${svmImage}`] });
  await again.waitSerial('kv ready');
  const r2 = await RespClient.connect(port);
  env.onCleanup(() => r2.close());
  assert.equal(await countMissing(r2, acked), 0, "the secondary's image holds every acknowledged write");
  assert.equal(await r2.command(['GET', 'after']), 'takeover');
  assert.deepEqual(svm.errorLines(), []);
  assert.match(svm.stderr, /warn .*the takeover waits in state io-error/);
});

test('colo up: the state folder with the secondary\'s disk fills up: the secondary is killed at once, the primary serves on and loses nothing', async (t) => {
  const env = new TestEnv(t);
  const stateDir = await env.tmpfs('small-fs', '2m');
  const pair = await startProtectedPair(env, ['--state-dir', stateDir]);
  const writer = await AckedWriter.start(pair.port, 'up-full:', (i) => `${i}:`.padEnd(2000, 'u'));
  pair.clients.push({ close: () => writer.stop() });
  const gone = await pair.sup.line(/^pair: secondary died \(killed: left COLO \(reason error\)\); primary (\d+) continues unprotected$/, pair.first.at, 30000);
  assert.equal(Number(gone.m[1]), pair.primary);
  // Not the primary going on alone after its grace period, with replies held until then.
  assert.ok(!pair.sup.lines.some((l) => /left COLO/.test(l) && l.startsWith(`pair: primary ${pair.primary}`)), pair.sup.timeline());
  assert.match(pair.sup.stderr, /could not be applied \(cannot store disk block \d+ in .*ENOSPC/);
  const n = writer.acked.size;
  t.diagnostic(`the secondary gave up after ${n} acknowledged writes; ${pair.sup.timeline()}`);
  await waitFor('200 more acknowledged writes on the primary', () => writer.acked.size >= n + 200, 20000);
  await writer.stop();
  const reader = await RespClient.connect(pair.port);
  pair.clients.push(reader);
  const missing = await countMissing(reader, writer.acked);
  assert.equal(missing, 0, `${missing} of ${writer.acked.size} acknowledged writes are missing on the primary`);
});

test('colo: the secondary\'s own writes go to a layer in $TMPDIR that each checkpoint empties, so a small $TMPDIR does not fill up', async (t) => {
  const env = new TestEnv(t);
  const tmp = await env.tmpfs('small-fs', '2m'); // for the secondary's $TMPDIR
  const [pvmDisk, svmDisk] = [env.image('pvm.img', 16 * 1024 * 1024), env.image('svm.img', 16 * 1024 * 1024)];
  const { pvm, svm, port } = await coloPair(env, pvmDisk, svmDisk, { delayMs: 100, svmEnv: { TMPDIR: tmp } });

  // 6 MiB of kv log, three times the secondary's $TMPDIR, written by both guests.
  const value = (i: number): string => `${i}:`.padEnd(500, 'l');
  const writer = await AckedWriter.start(port, 'layer:', value);
  env.onCleanup(() => writer.stop());
  await waitFor('12,000 acknowledged writes (6 MiB of log)', () => {
    if (svm.eventsOf('BLOCK_IO_ERROR').length > 0) throw new Error(`the secondary's $TMPDIR filled up after ${writer.acked.size} writes`);
    return writer.acked.size >= 12000;
  }, 120000);
  await writer.stop();
  assert.equal((await svm.qmp.execute<{ mode: string }>('query-colo-status')).mode, 'secondary', 'the pair is still in COLO');
  const stats = await pvm.qmp.execute<{ 'x-colo'?: { checkpoints?: number } }>('query-migrate');
  t.diagnostic(`${writer.acked.size} writes, ${JSON.stringify(stats['x-colo'])}`);
  assert.deepEqual(pvm.errorLines(), []);
  assert.deepEqual(svm.errorLines(), []);
});

test('colo up: when the last primary\'s disk cannot be copied back to a full --drive filesystem, the copy is kept (with its state folder) and named, and colo up exits 1', async (t) => {
  const env = new TestEnv(t);
  // The drive on a small filesystem; the state folder (no --state-dir: a temporary one) elsewhere.
  const { image } = await imageOnSmallFs(env, 'kv.img');
  const tmp = env.file('tmp');
  fs.mkdirSync(tmp);
  const port = await freePort();
  const args = [coloBin, 'up', guests.kv, '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`, '--memory', '256M', '--checkpoint-delay', '200'];
  const sup = new Supervisor(spawn(process.execPath, args, { cwd: env.dir, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, TMPDIR: tmp } }));
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
  const [p1, s2] = [Number(first.m[1]), Number(first.m[2])];
  const r = await RespClient.connect(port);
  clients.push(r);
  assert.equal(await r.command(['SET', 'before', '1']), 'OK');
  // A failover: vm2 serves now, on its own (sparse, 16 MiB) copy of the disk in the state folder.
  process.kill(p1, 'SIGKILL');
  await sup.line(new RegExp(`^pair: protected \\(primary pid ${s2}, secondary pid (\\d+)\\)$`), first.at + 1, 60000);
  const r2 = await RespClient.connect(port);
  clients.push(r2);
  assert.equal(await r2.command(['SET', 'after', '2']), 'OK');
  await r2.close();
  // Stopping copies vm2's disk to the drive, whose 2 MiB filesystem cannot take it.
  sup.proc.kill('SIGTERM');
  await sup.waitExit(15000);
  const why = `colo up printed: ${sup.timeline()}; its stderr ends: ${sup.stderr.slice(-2000)}`;
  assert.equal(sup.exitCode, 1, `the drive does not hold the last state: not a clean stop; ${why}`);
  const kept = /error .*could not copy the last primary's disk to .*kv\.img: ENOSPC.*; it stays at (\S+)$/m.exec(sup.stderr);
  assert.ok(kept !== null, `one error line naming the copy that was kept; ${why}`);
  assert.ok(fs.existsSync(kept[1]!), `the last primary's disk is still at ${kept[1]} (before, the temporary state folder was removed with it)`);
  // That copy holds the writes from before and after the failover.
  const vm = await env.startVm({ name: 'check', guest: guests.kv, args: ['--memory', '256M', '--drive', `file=${kept[1]!}`, '--net', `listen=127.0.0.1:${port}`] });
  const c = await waitFor('the check VM to answer', async () => RespClient.connect(port, '127.0.0.1', 500).catch(() => undefined), 30000);
  clients.push(c);
  assert.equal(await c.command(['GET', 'before']), '1');
  assert.equal(await c.command(['GET', 'after']), '2', 'the write acknowledged after the failover is on the kept disk');
  await vm.qmp.close();
});
