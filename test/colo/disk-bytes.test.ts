/**
 * The bytes of the disk image after every kind of end, checked against what the guest
 * acknowledged. kv.wasm logs every SET to its disk (a header with the committed length, then
 * CRC'd records) before it replies; readKvLog() reads that log straight from an image file, so
 * a torn or mixed image (a header that covers records of another state, a block of a partial
 * checkpoint) shows as a bad record, and a lost write as a missing key.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { TestEnv, coloBin, freePort, guests, waitFor, withTimeout } from '../framework/harness.js';
import { AckedWriter } from '../framework/resp.js';
import { pidAlive, qmpOf, spawnSupervisor, timeUntilServing } from '../framework/up.js';

const crcTable = Array.from({ length: 256 }, (_, i) => {
  let c = i;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(crc: number, b: Uint8Array): number {
  let c = ~crc >>> 0;
  for (const x of b) c = (crcTable[(c ^ x) & 0xff]! ^ (c >>> 8)) >>> 0;
  return ~c >>> 0;
}

/** kv's log on an image (examples/kv/persist.c): the keys its SET records leave, or what is wrong with it. */
export function readKvLog(image: string): { keys: Map<string, string>; records: number; error: string | null } {
  const b = fs.readFileSync(image);
  const keys = new Map<string, string>();
  if (b.toString('latin1', 0, 8) !== 'COLOKVLG') return { keys, records: 0, error: 'no kv header' };
  if (crc32(0, b.subarray(0, 32)) !== b.readUInt32LE(32)) return { keys, records: 0, error: 'header CRC' };
  const epoch = b.readUInt32LE(12);
  const start = Number(b.readBigUInt64LE(16));
  const end = start + Number(b.readBigUInt64LE(24));
  if (end > b.byteLength) return { keys, records: 0, error: `the header's log end ${end} is past the image (${b.byteLength})` };
  let at = start;
  let records = 0;
  while (at < end) {
    const plen = b.readUInt32LE(at);
    if (at + 8 + plen > end) return { keys, records, error: `record at ${at} (${plen} bytes) runs past the committed log end ${end}` };
    const payload = b.subarray(at + 8, at + 8 + plen);
    const pre = Buffer.alloc(8);
    pre.writeUInt32LE(epoch, 0);
    pre.writeUInt32LE(plen, 4);
    if (crc32(crc32(0, pre), payload) !== b.readUInt32LE(at + 4)) return { keys, records, error: `record at ${at} of the committed log fails its CRC` };
    const argc = payload.readUInt32LE(0);
    const args: string[] = [];
    let p = 4;
    for (let i = 0; i < argc; i++) {
      const n = payload.readUInt32LE(p);
      args.push(payload.toString('latin1', p + 4, p + 4 + n));
      p += 4 + n;
    }
    if (args[0]?.toUpperCase() === 'SET' && args.length >= 3) keys.set(args[1]!, args[2]!);
    records += 1;
    at += 8 + plen;
  }
  return { keys, records, error: null };
}

/** Keys of `acked` the log lacks or holds with another value (at most 5 named). */
function missing(log: Map<string, string>, acked: ReadonlyMap<string, string>): string[] {
  const out: string[] = [];
  for (const [k, v] of acked) if (log.get(k) !== v) out.push(k);
  return out;
}

/** 2 KiB values: a checkpoint carries many disk blocks, and the SVM's own writes fill its layer. */
const value = (prefix: string) => (i: number): string => `${prefix}${i}:`.padEnd(2048, String.fromCharCode(97 + (i % 26)));

test('colo up: the disk image after takeovers (between and mid-checkpoint, on a secondary made while the guest wrote) and a secondary lost mid-checkpoint holds every acknowledged write and no torn record', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const image = env.image('kv.img', 64 * 1024 * 1024);
  const sup = spawnSupervisor(env, [coloBin, 'up', guests.kv, '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`, '--memory', '256M', '--checkpoint-delay', '500', '--state-dir', env.dir]);
  const closers: { close(): unknown }[] = [];
  env.onCleanup(async () => {
    for (const c of closers) await c.close();
  });
  const first = await sup.line(/^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 90000);
  const [p1, s1] = [Number(first.m[1]), Number(first.m[2])];
  const acked = new Map<string, string>();
  const write = async (prefix: string): Promise<AckedWriter> => {
    // Paced: at full speed on a fast host the three writers filled kv's log on the 64 MiB
    // drive (about 40,000 records of 2 KiB) and every later SET got "ERR disk full".
    const w = await AckedWriter.start(port, prefix, value(prefix), 2);
    closers.push({ close: () => w.stop() });
    return w;
  };

  // 1. The primary dies between checkpoints (while the client writes).
  const w1 = await write('a:');
  await waitFor('300 acknowledged writes', () => w1.acked.size >= 300, 30000);
  process.kill(p1, 'SIGKILL');
  await withTimeout(w1.ended(), 10000, 'the writer to the dead primary to end');
  for (const [k, v] of w1.acked) acked.set(k, v);
  await timeUntilServing(port, performance.now(), 10000);

  // 2. The client writes on while the new secondary is made: its copy of the disk is taken
  // while the guest writes it.
  const w2 = await write('b:');
  const second = await sup.line(new RegExp(`^pair: protected \\(primary pid ${s1}, secondary pid (\\d+)\\)$`), first.at + 1, 90000);
  const s2 = Number(second.m[1]);
  const s2q = await qmpOf(s2, sup);
  closers.push(s2q);
  // A few checkpoints with the client writing, then the primary dies inside one: right after
  // the secondary paused for it, while its pages and blocks travel.
  await s2q.waitEvent('RESUME', { after: s2q.eventCount, nth: 3, timeoutMs: 20000 });
  await s2q.waitEvent('STOP', { after: s2q.eventCount, timeoutMs: 20000 });
  await new Promise((r) => setTimeout(r, 3));
  process.kill(s1, 'SIGKILL');
  await withTimeout(w2.ended(), 10000, 'the writer to the second dead primary to end');
  for (const [k, v] of w2.acked) acked.set(k, v);
  const took = await sup.line(new RegExp(`^pair: primary died \\(SIGKILL\\); secondary ${s2} took over`), second.at + 1, 15000);
  await timeUntilServing(port, performance.now(), 10000);

  // 3. Protected again, the secondary dies inside a checkpoint: the primary goes on alone.
  const w3 = await write('c:');
  const third = await sup.line(new RegExp(`^pair: protected \\(primary pid ${s2}, secondary pid (\\d+)\\)$`), took.at + 1, 90000);
  const s3 = Number(third.m[1]);
  const s3q = await qmpOf(s3, sup);
  closers.push(s3q);
  await s3q.waitEvent('RESUME', { after: s3q.eventCount, nth: 2, timeoutMs: 20000 });
  await s3q.waitEvent('STOP', { after: s3q.eventCount, timeoutMs: 20000 });
  process.kill(s3, 'SIGKILL');
  await sup.line(new RegExp(`^pair: secondary died \\(SIGKILL\\); primary ${s2} continues unprotected$`), third.at + 1, 15000);
  const more = w3.acked.size + 50;
  await waitFor('50 writes acknowledged by the primary alone', () => w3.acked.size >= more, 30000).catch((err: unknown) => {
    throw new Error(`${(err as Error).message} (acknowledged: ${w3.acked.size}, wanted ${more}; the writer ${w3.endedBy === null ? 'waits' : `ended: ${w3.endedBy}`}, last refusal ${w3.refused}); colo up printed: ${sup.timeline()}; its stderr ends: ${sup.stderr.slice(-4000)}`);
  });
  // 4. A clean stop: the last primary's disk becomes the --drive image.
  await w3.stop();
  for (const [k, v] of w3.acked) acked.set(k, v);
  for (const c of closers) await c.close();
  sup.proc.kill('SIGTERM');
  await sup.waitExit(30000);
  assert.equal(sup.exitCode, 0, sup.stderr.slice(-3000));
  for (const pid of sup.pids) assert.ok(!pidAlive(pid), `process ${pid} is gone`);

  for (const w of [w1, w2, w3]) assert.equal(w.refused, null, 'every SET was answered OK (a refusal: the drive filled, the test wrote too much)');
  const log = readKvLog(image);
  t.diagnostic(`${acked.size} acknowledged (${w1.acked.size} + ${w2.acked.size} + ${w3.acked.size}); ${log.records} records on the image; ${sup.timeline()}`);
  assert.equal(log.error, null, 'the committed log on the image is whole');
  const lost = missing(log.keys, acked);
  assert.deepEqual(lost.slice(0, 5), [], `${lost.length} acknowledged writes are not on the image`);
});
