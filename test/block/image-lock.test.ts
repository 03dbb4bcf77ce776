/**
 * Disk image locking (block/image-lock.ts), with real `colo run` processes: as QEMU's, a
 * read-write VM has the image to itself, snapshot=on users share it, and a lock whose holder
 * is gone (SIGKILL) does not block the next opener.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TestEnv, freePort, guests, waitFor, withTimeout, type VmProcess } from '../framework/harness.js';
import { assertAdvancing, assertStill, memwalkPair } from '../migration/helpers.js';
import { RespClient } from '../framework/resp.js';
import { startProtectedPair } from '../framework/up.js';
import { Disk } from '../../src/block/disk.js';
import fs from 'node:fs';
import path from 'node:path';
import { limits } from '../../src/core/limits.js';
import { lockDirOf, lockImage, type ImageLock } from '../../src/block/image-lock.js';
import { ImageLockError } from '../../src/core/errors.js';
import { FrameType } from '../../src/migration/stream.js';
import { fakeDestination, plainReady } from '../framework/fake-destination.js';

test('image lock: a second read-write VM (or a snapshot reader) on an image a VM writes is refused, naming the holder; the first VM\'s data intact', async (t) => {
  const env = new TestEnv(t);
  const [port, port2] = [await freePort(), await freePort()];
  const image = env.image('x.img', 8 * 1024 * 1024);
  const a = await env.startVm({ name: 'a', guest: guests.kv, args: ['--memory', '64M', '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`] });
  await a.waitSerial('kv ready');
  const c = await RespClient.connect(port);
  env.onCleanup(() => c.close());
  for (let i = 0; i < 50; i++) assert.equal(await c.command(['SET', `k${i}`, `v${i}`]), 'OK');
  const hash = env.hashFile(image);
  for (const extra of [[], ['--snapshot']]) {
    const b = await env.startVm({ name: `b${extra.length}`, guest: guests.kv, noQmp: true, args: ['--memory', '64M', '--net', `listen=127.0.0.1:${port2}`, '--drive', `file=${image}`, ...extra] });
    assert.equal(await b.waitExit(30000), 1, `the second VM exits with status 1: ${b.stderr}`);
    const want = extra.length === 0 ? 'write' : 'read';
    assert.match(b.stderr, new RegExp(`Failed to get "${want}" lock on drive '.*x\\.img': process ${a.child.pid} writes it`));
    assert.equal(b.stderr.trim().split('\n').length, 1, `one clear line, got: ${b.stderr}`);
  }
  assert.equal(env.hashFile(image), hash, 'the refused VMs did not write the image');
  assert.equal(await c.command(['GET', 'k49']), 'v49', 'the first VM serves on');
  c.close();
  await a.stop();
  // Released on quit: the image opens again.
  const again = await env.startVm({ name: 'again', guest: guests.kv, args: ['--memory', '64M', '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`] });
  await again.waitSerial('kv ready');
  const r = await RespClient.whenServing(port, 'the VM opened after the holder quit');
  env.onCleanup(() => r.close());
  assert.equal(await r.command(['GET', 'k0']), 'v0');
  r.close();
  await again.stop();
});

test('image lock: two snapshot=on VMs share one image; a read-write VM is refused while they run', async (t) => {
  const env = new TestEnv(t);
  const image = env.image('base.img', 4 * 1024 * 1024);
  const hash = env.hashFile(image);
  const ports = [await freePort(), await freePort(), await freePort()];
  const readers = await Promise.all(
    [0, 1].map((i) => env.startVm({ name: `r${i}`, guest: guests.kv, args: ['--memory', '64M', '--net', `listen=127.0.0.1:${ports[i]}`, '--drive', `file=${image}`, '--snapshot'] })),
  );
  for (const r of readers) await r.waitSerial('kv ready');
  for (const [i, port] of ports.slice(0, 2).entries()) {
    const c = await RespClient.connect(port);
    env.onCleanup(() => c.close());
    assert.equal(await c.command(['SET', 'who', `r${i}`]), 'OK');
    assert.equal(await c.command(['GET', 'who']), `r${i}`);
    c.close();
  }
  const w = await env.startVm({ name: 'w', guest: guests.kv, noQmp: true, args: ['--memory', '64M', '--net', `listen=127.0.0.1:${ports[2]}`, '--drive', `file=${image}`] });
  assert.equal(await w.waitExit(30000), 1, `the writer exits with status 1: ${w.stderr}`);
  assert.match(w.stderr, new RegExp(`Failed to get "write" lock on drive '.*base\\.img': process (${readers.map((r) => r.child.pid).join('|')}) reads it \\(snapshot=on\\)`));
  await Promise.all(readers.map((r) => r.stop()));
  assert.equal(env.hashFile(image), hash, 'the shared image is unchanged');
});

test('image lock: the lock of a VM killed with SIGKILL does not block the next read-write VM, which finds the acknowledged data', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const image = env.image('k.img', 8 * 1024 * 1024);
  const args = ['--memory', '64M', '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`];
  const a = await env.startVm({ name: 'a', guest: guests.kv, args });
  await a.waitSerial('kv ready');
  const c = await RespClient.connect(port);
  env.onCleanup(() => c.close());
  assert.equal(await c.command(['SET', 'before', 'kill']), 'OK');
  c.close();
  a.kill('SIGKILL');
  await a.waitExit(10000);
  const b = await env.startVm({ name: 'b', guest: guests.kv, args });
  await b.waitSerial('kv ready');
  const r = await RespClient.whenServing(port, 'the VM opened after the SIGKILL');
  env.onCleanup(() => r.close());
  assert.equal(await r.command(['GET', 'before']), 'kill');
  r.close();
  await b.stop();
  assert.deepEqual(b.errorLines(), []);
});

test('image lock: colo up does not copy the last primary\'s disk over a --drive image another VM opened after the failover; the copy stays in the state folder', async (t) => {
  const env = new TestEnv(t);
  const pair = await startProtectedPair(env);
  const { sup, port, image, first, primary: p1, secondary: s2, clients } = pair;
  process.kill(p1, 'SIGKILL');
  await sup.line(new RegExp(`^pair: protected \\(primary pid ${s2}, secondary pid (\\d+)\\)$`), first.at + 1, 90000);
  const r = await RespClient.connect(port);
  clients.push(r);
  assert.equal(await r.command(['SET', 'after', 'failover']), 'OK', 'vm2 writes its own copy of the disk');
  // vm1's lock went with it: another VM opens the drive image read-write.
  const other = await env.startVm({ name: 'other', guest: guests.spin, args: ['--memory', '64M', '--drive', `file=${image}`] });
  const hash = env.hashFile(image);
  await r.close();
  sup.proc.kill('SIGTERM');
  await sup.waitExit(30000);
  assert.match(sup.stderr, new RegExp(`could not copy the last primary's disk to .*kv\\.img: Failed to get "write" lock .*process ${other.child.pid} writes it.*; it stays at .*vm2\\.img`));
  assert.equal(env.hashFile(image), hash, 'the other VM\'s image was not overwritten');
  assert.ok(fs.existsSync(path.join(env.dir, 'vm2.img')), 'the last primary\'s disk is kept');
  await other.stop();
});

test('image lock: an image on a full filesystem (no inode left) opens and is locked: as QEMU\'s, the lock needs no room next to the image', async (t) => {
  const env = new TestEnv(t);
  // Two inodes: the root and the image; the lock directory cannot be made (ENOSPC).
  const mnt = await env.tmpfs('full', '1m,nr_inodes=2');
  const image = path.join(mnt, 'full.img');
  fs.writeFileSync(image, Buffer.alloc(64 * 1024, 7));
  assert.throws(() => fs.mkdirSync(path.join(mnt, 'probe')), /ENOSPC/, 'the filesystem has no inode left');
  const d = Disk.open(image, { snapshot: false });
  try {
    assert.equal(writeLockPid(image), process.pid, 'the image is locked all the same');
    const b = Buffer.alloc(16);
    d.read(b, 0);
    assert.deepEqual([...b], Array(16).fill(7));
  } finally {
    d.close();
  }
});

test('image lock: an incoming migration whose destination image another VM writes is refused before a block is written; the source runs on', async (t) => {
  const env = new TestEnv(t);
  const [srcDisk, dstDisk] = [env.image('src.img', 4 * 1024 * 1024, (b) => b.fill(0x5a, 0, 1 << 20)), env.image('dst.img', 4 * 1024 * 1024)];
  const holder = await env.startVm({ name: 'holder', guest: guests.spin, args: ['--memory', '64M', '--drive', `file=${dstDisk}`] });
  const hash = env.hashFile(dstDisk);
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.spin, args: ['--memory', '64M', '--drive', `file=${srcDisk}`] }),
    // Opened unlocked, as QEMU's inactive image of -incoming: it starts.
    env.startVm({ name: 'dst', guest: guests.spin, args: ['--memory', '64M', '--drive', `file=${dstDisk}`, '--incoming', 'defer'] }),
  ]);
  const migPort = await dst.listenIncoming();
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  const info = await src.waitMigrationStatus('failed', 30000);
  assert.match(String(info['error-desc']), new RegExp(`Failed to get "write" lock on drive '.*dst\\.img': process ${holder.child.pid} writes it.* \\[DRIVE_LOCKED\\]$`));
  assert.equal(await src.status(), 'running', 'the source runs on');
  assert.equal(env.hashFile(dstDisk), hash, 'the holder\'s image got no block of the migration');
  await Promise.all([src.stop(), holder.stop(), dst.alive ? dst.stop() : Promise.resolve()]);
});

test('image lock: a VM restored from a file (--incoming file:) holds its image: a second read-write VM is refused', async (t) => {
  const env = new TestEnv(t);
  const image = env.image('f.img', 4 * 1024 * 1024);
  const saved = env.file('state.bin');
  const a = await env.startVm({ name: 'a', guest: guests.spin, args: ['--memory', '64M', '--drive', `file=${image}`] });
  await a.qmp.execute('stop');
  await a.qmp.execute('migrate', { uri: `file:${saved}` });
  await a.waitMigrationStatus('completed', 30000);
  await a.stop();
  const restored = await env.startVm({ name: 'restored', guest: guests.spin, args: ['--memory', '64M', '--drive', `file=${image}`, '--incoming', `file:${saved}`] });
  const b = await env.startVm({ name: 'b', guest: guests.spin, noQmp: true, args: ['--memory', '64M', '--drive', `file=${image}`] });
  assert.equal(await b.waitExit(30000), 1, `the second VM exits with status 1: ${b.stderr}`);
  assert.match(b.stderr, new RegExp(`Failed to get "write" lock on drive '.*f\\.img': process ${restored.child.pid} writes it`));
  await restored.stop();
});

/** The pid holding the write lock of `image` (the `write` entry of its lock directory), or null. */
function writeLockPid(image: string): number | null {
  try {
    return Number(fs.readlinkSync(path.join(lockDirOf(image), 'write')).split(':')[0]);
  } catch {
    return null;
  }
}

/**
 * A memwalk source and a `--incoming` destination on one image file (no --snapshot), the
 * destination thawed at cleanup (tests freeze it); the migration is started, round 1 throttled
 * to `bandwidth` bytes/s, with a downtime limit that makes round 1 the last precopy round.
 */
async function migrateOnSharedImage(env: TestEnv, image: string, o: { region: string; memory: string; bandwidth: number }): Promise<{ src: VmProcess; dst: VmProcess; mark: number; dstMark: number }> {
  const { src, dst, port } = await memwalkPair(env, {
    region: o.region,
    memory: o.memory,
    parameters: { 'max-bandwidth': o.bandwidth, 'downtime-limit': 1_000_000 },
    srcArgs: ['--drive', `file=${image}`],
    dstArgs: ['--drive', `file=${image}`],
  });
  env.onCleanup(() => dst.kill('SIGCONT'));
  assert.equal(writeLockPid(image), src.child.pid, 'the source holds its image');
  const mark = src.qmp.eventCount;
  const dstMark = dst.qmp.eventCount;
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  return { src, dst, mark, dstMark };
}

test('image lock: a live migration on one shared image (no --snapshot) hands the write lock over: the destination runs with it and the data, a third VM is refused after the source quits', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const image = env.image('shared.img', 8 * 1024 * 1024);
  const args = ['--memory', '64M', '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`];
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.kv, args }),
    env.startVm({ name: 'dst', guest: guests.kv, args: [...args, '--incoming', 'defer'] }),
  ]);
  await src.waitSerial('kv ready');
  const c = await RespClient.connect(port);
  env.onCleanup(() => c.close());
  for (let i = 0; i < 20; i++) assert.equal(await c.command(['SET', `k${i}`, `v${i}`]), 'OK');
  c.close();
  assert.equal(writeLockPid(image), src.child.pid, 'the source holds the image before the migration');
  const migPort = await dst.listenIncoming();
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  await src.waitMigrationStatus('completed', 30000);
  await dst.waitMigrationStatus('completed', 30000);
  assert.equal(await dst.status(), 'running', 'the destination runs');
  assert.equal(writeLockPid(image), dst.child.pid, 'the destination holds the image once it runs');
  await src.stop();
  assert.equal(writeLockPid(image), dst.child.pid, 'the source quitting leaves the destination\'s lock alone');
  const r = await RespClient.whenServing(port, 'the destination after the switchover');
  env.onCleanup(() => r.close());
  assert.equal(await r.command(['GET', 'k19']), 'v19', 'the destination has the data the source wrote');
  assert.equal(await r.command(['SET', 'after', 'migration']), 'OK');
  r.close();
  const third = await env.startVm({ name: 'third', guest: guests.spin, noQmp: true, args: ['--memory', '64M', '--drive', `file=${image}`] });
  assert.equal(await third.waitExit(30000), 1, `a third read-write VM is refused: ${third.stderr}`);
  assert.match(third.stderr, new RegExp(`Failed to get "write" lock on drive '.*shared\\.img': process ${dst.child.pid} writes it`));
  await dst.stop();
  assert.equal(writeLockPid(image), null, 'released on quit');
  assert.deepEqual([...src.errorLines(), ...dst.errorLines()], []);
});

for (const how of ['cancel', 'failure'] as const) {
  test(`image lock: a migration on one shared image ${how === 'cancel' ? 'cancelled' : 'failed (the destination killed)'} after the source let the image go: the source takes its lock back and runs on; the destination never ran`, async (t) => {
    const env = new TestEnv(t);
    const image = env.image('shared.img', 4 * 1024 * 1024);
    // 64 MiB dirtied during round 1: the last round is more than the socket buffers hold, so
    // a destination stopped at stop-and-copy keeps the source waiting before `go`.
    const { src, dst, mark, dstMark } = await migrateOnSharedImage(env, image, { region: '64M', memory: '128M', bandwidth: 32 * 1024 * 1024 });
    await src.waitEvent('MIGRATION', { after: mark, where: (e) => e.data.status === 'device', timeoutMs: 60000 });
    dst.kill('SIGSTOP');
    await waitFor('the source to let the image go at stop-and-copy', () => writeLockPid(image) !== src.child.pid, 10000);
    assert.equal(writeLockPid(image), null, 'nobody holds the image during the switchover');
    if (how === 'cancel') {
      await src.qmp.execute('migrate_cancel');
      await src.waitMigrationStatus('cancelled', 15000);
    } else {
      dst.kill('SIGKILL');
      await src.waitMigrationStatus('failed', 15000);
    }
    await waitFor('the source to run again', async () => (await src.status()) === 'running', 10000);
    assert.equal(writeLockPid(image), src.child.pid, 'the source holds its image again');
    await assertAdvancing(src);
    if (how === 'cancel') {
      dst.kill('SIGCONT');
      assert.equal(await dst.waitExit(15000), 1, 'the destination exits non-zero');
      assert.equal(dst.eventsOf('RESUME', dstMark).length, 0, 'the destination never ran');
    }
    assert.equal(writeLockPid(image), src.child.pid, 'the destination\'s end leaves the source\'s lock alone');
    const other = await env.startVm({ name: 'other', guest: guests.spin, noQmp: true, args: ['--memory', '64M', '--drive', `file=${image}`] });
    assert.equal(await other.waitExit(30000), 1, `another read-write VM is refused: ${other.stderr}`);
    assert.match(other.stderr, new RegExp(`process ${src.child.pid} writes it`));
    await src.stop();
    assert.deepEqual(src.errorLines(), []);
  });
}

test('image lock: a destination that cannot take the shared image at the switchover (another VM took it) fails the migration with DRIVE_LOCKED and never runs; the source stays paused until cont takes its image back', async (t) => {
  const env = new TestEnv(t);
  const image = env.image('shared.img', 4 * 1024 * 1024);
  const { src, dst, mark, dstMark } = await migrateOnSharedImage(env, image, { region: '64M', memory: '128M', bandwidth: 32 * 1024 * 1024 });
  await src.waitEvent('MIGRATION', { after: mark, where: (e) => e.data.status === 'device', timeoutMs: 60000 });
  dst.kill('SIGSTOP');
  await waitFor('the source to let the image go at stop-and-copy', () => writeLockPid(image) === null, 10000);
  const intruder = await env.startVm({ name: 'intruder', guest: guests.spin, args: ['--memory', '64M', '--drive', `file=${image}`] });
  assert.equal(writeLockPid(image), intruder.child.pid);
  dst.kill('SIGCONT');
  const info = await src.waitMigrationStatus('failed', 30000);
  // The destination's code travels with its error reply: error-desc names the real cause.
  assert.match(String(info['error-desc']), new RegExp(`^the destination failed: Failed to get "write" lock on drive '.*shared\\.img': process ${intruder.child.pid} writes it.* \\[DRIVE_LOCKED\\]$`));
  await waitFor('the destination to log why it failed', () => /incoming migration failed: Failed to get "write" lock.* \[DRIVE_LOCKED\]/.test(dst.stderr), 10000);
  assert.equal(dst.eventsOf('RESUME', dstMark).length, 0, 'the destination never ran');
  await waitFor('the source to come out of the switchover', async () => (await src.status()) === 'paused', 10000);
  await assertStill(src);
  assert.equal(writeLockPid(image), intruder.child.pid, 'the other VM keeps the image');
  await assert.rejects(src.qmp.execute('cont'), /Failed to get "write" lock/, 'cont refused while another VM holds the image');
  await intruder.stop();
  await src.qmp.execute('cont');
  assert.equal(await src.status(), 'running');
  assert.equal(writeLockPid(image), src.child.pid, 'the source holds its image again');
  await assertAdvancing(src);
  await src.stop();
  if (dst.alive) await dst.stop();
});

/**
 * A destination on the source's own image that takes the image's write lock (in this test
 * process) once the whole state has arrived (`end`), as a real destination does at its restore,
 * and then does not answer `loaded`: the moment between the lock and `go` held open. The
 * source's abort frame ends the connection.
 */
class LockingDestination {
  lock: ImageLock | null = null;
  readonly locked: Promise<void>;
  private resolveLocked!: () => void;

  private constructor(private readonly image: string) {
    this.locked = new Promise((r) => (this.resolveLocked = r));
  }

  static async start(env: TestEnv, image: string): Promise<{ dest: LockingDestination; port: number }> {
    const dest = new LockingDestination(image);
    // Registered first, so run after the fake's own cleanup (last in, first out).
    env.onCleanup(() => dest.release());
    const { port } = await fakeDestination(env, (f, c) => {
      if (f.type === FrameType.setup) c.reply(plainReady({ disk: 'shared' }));
      else if (f.type === FrameType.end) {
        dest.lock = lockImage(dest.image, 'write');
        dest.resolveLocked();
      } else if (f.type === FrameType.abort) c.socket.end();
    });
    return { dest, port };
  }

  release(): void {
    this.lock?.release();
    this.lock = null;
  }
}

for (const letGo of [true, false]) {
  test(`image lock: migrate_cancel after the destination took the shared image but before \`go\`: ${letGo ? 'the destination lets it go a moment later and the source takes it back and runs on' : 'a destination that keeps it holds the source paused only limits.diskLockHandbackWaitMs, with one error line; cont then takes it'}`, async (t) => {
    const env = new TestEnv(t);
    const image = env.image('shared.img', 4 * 1024 * 1024);
    const src = await env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '32M', '--drive', `file=${image}`], guestArgs: ['8M'] });
    await src.setMigration({}, { 'downtime-limit': 1_000_000 });
    await src.waitSerial('B', { count: 3 });
    const { dest, port } = await LockingDestination.start(env, image);
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    await withTimeout(dest.locked, 30000, 'the destination to receive the whole state and take the image');
    assert.equal(writeLockPid(image), process.pid, 'the destination holds the image');
    assert.equal(await src.status(), 'finish-migrate');
    const cancelledAt = Date.now();
    await src.qmp.execute('migrate_cancel');
    if (letGo) {
      // As a real destination that reads the abort (or sees the channel close) a moment later.
      await new Promise((r) => setTimeout(r, Math.min(300, limits.diskLockHandbackWaitMs / 4)));
      dest.release();
      await src.waitMigrationStatus('cancelled', limits.diskLockHandbackWaitMs + 10000);
      await waitFor('the source to run again', async () => (await src.status()) === 'running', 10000);
      assert.equal(writeLockPid(image), src.child.pid, 'the source holds its image again');
      await assertAdvancing(src);
      assert.deepEqual(src.errorLines(), []);
    } else {
      await src.waitMigrationStatus('cancelled', limits.diskLockHandbackWaitMs + 10000);
      const waited = Date.now() - cancelledAt;
      assert.ok(waited >= limits.diskLockHandbackWaitMs, `the source tried ${waited} ms, not limits.diskLockHandbackWaitMs (${limits.diskLockHandbackWaitMs} ms)`);
      assert.equal(await src.status(), 'paused');
      await assertStill(src);
      const lines = src.errorLines();
      assert.equal(lines.length, 1, `one error line: ${lines.join('\n')}`);
      assert.match(lines[0]!, new RegExp(`the VM stays paused after the cancelled migration: Failed to get "write" lock on drive '.*shared\\.img': process ${process.pid} writes it.*\\[DRIVE_LOCKED\\]`));
      dest.release();
      await src.qmp.execute('cont');
      assert.equal(await src.status(), 'running');
      assert.equal(writeLockPid(image), src.child.pid, 'cont took the image back');
      await assertAdvancing(src);
    }
    await src.stop();
  });
}

test('image lock: migrate_cancel after the source sent the whole state to a frozen destination: the source takes its image back, and the destination, reading on, logs the cancel, not the lock it could not take', async (t) => {
  const env = new TestEnv(t);
  const image = env.image('shared.img', 4 * 1024 * 1024);
  // A small guest: the whole stream fits in the socket buffers while the destination is frozen.
  // Round 1 throttled (the last round is not): the freeze lands well before round 1 ends.
  const { src, dst, mark, dstMark } = await migrateOnSharedImage(env, image, { region: '1M', memory: '16M', bandwidth: 2 * 1024 * 1024 });
  await src.waitEvent('MIGRATION', { after: mark, where: (e) => e.data.status === 'active', timeoutMs: 30000 });
  dst.kill('SIGSTOP');
  await src.waitEvent('MIGRATION', { after: mark, where: (e) => e.data.status === 'device', timeoutMs: 30000 });
  await waitFor('the source to let the image go at stop-and-copy', () => writeLockPid(image) === null, 10000);
  await new Promise((r) => setTimeout(r, 500)); // the last round, device state and end are sent
  await src.qmp.execute('migrate_cancel');
  await src.waitMigrationStatus('cancelled', limits.diskLockHandbackWaitMs + 10000);
  assert.equal(await src.status(), 'running');
  assert.equal(writeLockPid(image), src.child.pid, 'the source holds its image again');
  dst.kill('SIGCONT');
  assert.equal(await dst.waitExit(15000), 1, 'the destination exits non-zero');
  assert.match(dst.stderr, /incoming migration cancelled: the source cancelled the migration/);
  assert.deepEqual(dst.errorLines(), [], 'the destination logs the cancel, not an error');
  assert.equal(dst.eventsOf('RESUME', dstMark).length, 0, 'the destination never ran');
  await assertAdvancing(src);
  await src.stop();
  assert.deepEqual(src.errorLines(), []);
});

test('image lock: two hard links of one image are one image: a VM on the second name is refused while a VM writes through the first (QEMU locks the inode)', async (t) => {
  const env = new TestEnv(t);
  const image = env.image('h.img', 4 * 1024 * 1024);
  fs.mkdirSync(env.file('other'));
  const link = env.file('other/h-link.img');
  fs.linkSync(image, link);
  const a = await env.startVm({ name: 'a', guest: guests.spin, args: ['--memory', '64M', '--drive', `file=${image}`] });
  for (const extra of [[], ['--snapshot']]) {
    const b = await env.startVm({ name: `b${extra.length}`, guest: guests.spin, noQmp: true, args: ['--memory', '64M', '--drive', `file=${link}`, ...extra] });
    assert.equal(await b.waitExit(30000), 1, `the VM on the second name exits with status 1: ${b.stderr}`);
    assert.match(b.stderr, new RegExp(`Failed to get "${extra.length === 0 ? 'write' : 'read'}" lock on drive '.*h-link\\.img': process ${a.child.pid} writes it`));
  }
  await a.stop();
  assert.equal(writeLockPid(image), null, 'released on quit');
});

test('image lock: a live migration between two hard links of one image hands over the one lock: a third VM on the source\'s name is refused while the destination runs', async (t) => {
  const env = new TestEnv(t);
  const image = env.image('src.img', 4 * 1024 * 1024);
  fs.mkdirSync(env.file('dst'));
  const link = env.file('dst/dst.img');
  fs.linkSync(image, link);
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.spin, args: ['--memory', '64M', '--drive', `file=${image}`] }),
    env.startVm({ name: 'dst', guest: guests.spin, args: ['--memory', '64M', '--drive', `file=${link}`, '--incoming', 'defer'] }),
  ]);
  const migPort = await dst.listenIncoming();
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  await src.waitMigrationStatus('completed', 30000);
  await dst.waitMigrationStatus('completed', 30000);
  assert.equal(await dst.status(), 'running');
  assert.equal(writeLockPid(link), dst.child.pid, 'the destination holds the image');
  await src.stop();
  const third = await env.startVm({ name: 'third', guest: guests.spin, noQmp: true, args: ['--memory', '64M', '--drive', `file=${image}`] });
  assert.equal(await third.waitExit(30000), 1, `a VM on the source's name is refused: ${third.stderr}`);
  assert.match(third.stderr, new RegExp(`Failed to get "write" lock on drive '.*src\\.img': process ${dst.child.pid} writes it`));
  await dst.stop();
});

test('image lock: an incoming --snapshot destination on the image a running VM writes starts (inactive, unlocked, as QEMU\'s) and takes its read lock at the switchover; it runs on the data, the image unchanged by it', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const image = env.image('s.img', 8 * 1024 * 1024);
  const args = ['--memory', '64M', '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`];
  const src = await env.startVm({ name: 'src', guest: guests.kv, args });
  await src.waitSerial('kv ready');
  const c = await RespClient.connect(port);
  env.onCleanup(() => c.close());
  for (let i = 0; i < 20; i++) assert.equal(await c.command(['SET', `k${i}`, `v${i}`]), 'OK');
  c.close();
  const dst = await env.startVm({ name: 'dst', guest: guests.kv, args: [...args, '--snapshot', '--incoming', 'defer'] });
  assert.equal(writeLockPid(image), src.child.pid, 'the source keeps the image until the switchover');
  const migPort = await dst.listenIncoming();
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  await src.waitMigrationStatus('completed', 30000);
  await dst.waitMigrationStatus('completed', 30000);
  assert.equal(await dst.status(), 'running');
  await src.stop();
  const hash = env.hashFile(image);
  const r = await RespClient.whenServing(port, 'the snapshot destination after the switchover');
  env.onCleanup(() => r.close());
  assert.equal(await r.command(['GET', 'k19']), 'v19', 'the destination has the data the source wrote');
  assert.equal(await r.command(['SET', 'after', 'migration']), 'OK');
  r.close();
  const w = await env.startVm({ name: 'w', guest: guests.spin, noQmp: true, args: ['--memory', '64M', '--drive', `file=${image}`] });
  assert.equal(await w.waitExit(30000), 1, `a read-write VM is refused while the snapshot destination reads the image: ${w.stderr}`);
  assert.match(w.stderr, new RegExp(`Failed to get "write" lock on drive '.*s\\.img': process ${dst.child.pid} reads it`));
  await dst.stop();
  assert.equal(env.hashFile(image), hash, 'the snapshot destination did not write the image');
  assert.deepEqual([...src.errorLines(), ...dst.errorLines()], []);
});

test('image lock: a write entry that keeps coming back stale ends in DRIVE_LOCKED after limits.diskLockStaleTakeoversMax takeovers, not in an endless loop', (t) => {
  const env = new TestEnv(t);
  const image = env.image('loop.img', 64 * 1024);
  const first = lockImage(image, 'write');
  assert.notEqual(first, null);
  // As if another opener kept putting a dead process's entry back: every read of it is stale.
  const readlink = fs.readlinkSync;
  t.mock.method(fs, 'readlinkSync', (p: fs.PathLike) => (String(p).startsWith(lockDirOf(image)) ? '999999999:1' : readlink(p)));
  try {
    assert.throws(
      () => lockImage(image, 'write'),
      (err: unknown) => err instanceof ImageLockError && err.code === 'DRIVE_LOCKED' && err.message.includes(`after ${limits.diskLockStaleTakeoversMax} takeovers`),
    );
  } finally {
    t.mock.restoreAll();
    first!.release();
  }
});

test('image lock: a --snapshot incoming destination\'s read lock is taken at activate and given back at inactivate (a migration failed before `go`), so that the source can write again', (t) => {
  const env = new TestEnv(t);
  const image = env.image('inact.img', 64 * 1024);
  const d = Disk.open(image, { snapshot: true, lock: 'deferred' });
  try {
    assert.equal(d.inactive, true);
    const w = lockImage(image, 'write');
    assert.notEqual(w, null, 'an inactive destination holds no lock');
    assert.throws(() => d.activate(), (err: unknown) => err instanceof ImageLockError && /Failed to get "read" lock/.test(err.message));
    w!.release();
    d.activate();
    assert.throws(() => lockImage(image, 'write'), /reads it \(snapshot=on\)/, 'the active destination reads the image');
    d.inactivate();
    const back = lockImage(image, 'write');
    assert.notEqual(back, null, 'the source takes its image back');
    back!.release();
  } finally {
    d.close();
  }
});

test('image lock: the lock directories of SIGKILLed holders of deleted images are swept by later opens (a bounded number each); a live holder\'s lock survives every sweep', async (t) => {
  const env = new TestEnv(t);
  const backdate = (dir: string): void => {
    const old = new Date(Date.now() - limits.diskLockSweepIdleMs - 60_000);
    fs.utimesSync(dir, old, old);
  };
  // Every image made first: a deleted image's inode, reused for one made later, would be
  // that one's lock directory.
  const liveImage = env.image('live.img', 64 * 1024);
  const openerImage = env.image('opener.img', 64 * 1024);
  const scratch = env.image('scratch.img', 64 * 1024);
  const goneImages = ['gone0', 'gone1'].map((name) => env.image(`${name}.img`, 64 * 1024));
  // Two holders SIGKILLed (no exit listener runs), their images deleted: no opener of those
  // inodes will ever take their entries over.
  const deadDirs: string[] = [];
  for (const [i, image] of goneImages.entries()) {
    const name = `gone${i}`;
    const vm = await env.startVm({ name, guest: guests.spin, args: ['--memory', '16M', '--drive', `file=${image}`] });
    const dir = lockDirOf(image);
    assert.equal(writeLockPid(image), vm.child.pid, `${name} holds its image`);
    vm.kill('SIGKILL');
    await vm.waitExit(10000);
    fs.rmSync(image);
    assert.equal(fs.readlinkSync(path.join(dir, 'write')).split(':')[0], String(vm.child.pid), `${name}'s entry is left behind`);
    backdate(dir);
    deadDirs.push(dir);
  }
  // A pid that is alive but another process than the one that made the entry (pid reuse).
  const reused = path.join(path.dirname(deadDirs[0]!), `0-${process.pid}${Date.now()}`);
  fs.mkdirSync(reused);
  fs.symlinkSync(`${process.pid}:1`, path.join(reused, 'write'));
  backdate(reused);
  deadDirs.push(reused);
  env.onCleanup(() => fs.rmSync(reused, { recursive: true, force: true }));
  const live = await env.startVm({ name: 'live', guest: guests.spin, args: ['--memory', '16M', '--drive', `file=${liveImage}`] });
  const liveDir = lockDirOf(liveImage);
  backdate(liveDir);
  // A real VM's open sweeps; the lock root is shared with every VM of the host, so more opens
  // (each looks at limits.diskLockSweepDirsMax directories) until the dead ones are gone.
  const opener = await env.startVm({ name: 'opener', guest: guests.spin, args: ['--memory', '16M', '--drive', `file=${openerImage}`] });
  for (let round = 0; round < 2000 && deadDirs.some((d) => fs.existsSync(d)); round++) {
    lockImage(scratch, 'write')!.release();
    assert.equal(writeLockPid(liveImage), live.child.pid, `the live holder keeps its lock (round ${round})`);
    backdate(liveDir);
  }
  assert.deepEqual(deadDirs.filter((d) => fs.existsSync(d)), [], 'the dead holders\' directories are swept');
  assert.equal(writeLockPid(liveImage), live.child.pid, 'the live holder keeps its lock');
  const second = await env.startVm({ name: 'second', guest: guests.spin, noQmp: true, args: ['--memory', '16M', '--drive', `file=${liveImage}`] });
  assert.equal(await second.waitExit(30000), 1, `a second writer is still refused: ${second.stderr}`);
  assert.match(second.stderr, new RegExp(`process ${live.child.pid} writes it`));
  await Promise.all([live.stop(), opener.stop()]);
  assert.equal(fs.existsSync(liveDir), false, 'the live holder removes its own directory on quit');
});

test('image lock: sweeps leave a live reader\'s directory and one just made (an opener between its mkdir and its entry) alone', (t) => {
  const env = new TestEnv(t);
  const [readImage, scratch] = [env.image('r.img', 64 * 1024), env.image('scratch.img', 64 * 1024)];
  const reader = lockImage(readImage, 'read');
  assert.notEqual(reader, null);
  const readDir = lockDirOf(readImage);
  const old = new Date(Date.now() - limits.diskLockSweepIdleMs - 60_000);
  fs.utimesSync(readDir, old, old);
  const fresh = path.join(path.dirname(readDir), `0-fresh${process.pid}${Date.now()}`);
  fs.mkdirSync(fresh);
  env.onCleanup(() => fs.rmSync(fresh, { recursive: true, force: true }));
  try {
    // Enough rounds that every directory of the shared root is looked at, many times over.
    const rounds = Math.ceil((fs.readdirSync(path.dirname(readDir)).length / limits.diskLockSweepDirsMax) * 20);
    for (let i = 0; i < rounds; i++) lockImage(scratch, 'write')!.release();
    assert.ok(fs.existsSync(fresh), 'the directory just made is not swept');
    assert.throws(() => lockImage(readImage, 'write'), /reads it \(snapshot=on\)/, 'the live reader still holds the image');
  } finally {
    reader!.release();
  }
});
