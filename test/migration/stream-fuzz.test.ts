/**
 * Seeded fuzzing of the destination with real streams: one written by `migrate` to a file:
 * and one recorded on the main channel of a real TCP migration. Each iteration mutates a copy
 * (frames changed, dropped, repeated, swapped or retyped and re-encoded with valid checksums,
 * so that the mutation gets past the CRC to the parsers; or bytes flipped or cut) and feeds
 * it to the destination: loadMachineFromFile, or the real IncomingMigration in-process. Each
 * must end, in bounded time, with the guest loaded or a typed error (ColoError with a stable
 * code), never an untyped one, a crash or a hang. A failure names its seed; COLO_FUZZ_SEED
 * and COLO_FUZZ_ITERATIONS replay or widen a run.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { TestEnv, guests, waitFor, withTimeout } from '../framework/harness.js';
import { rng } from '../framework/rng.js';
import { loadGuest } from '../../src/machine/instrument.js';
import { Machine } from '../../src/machine/machine.js';
import { ColoError } from '../../src/core/errors.js';
import { loadMachineFromFile } from '../../src/migration/file.js';
import { IncomingMigration } from '../../src/migration/destination.js';
import { FrameDecoder, FrameEncoder, FrameType, encodePreamble, type Frame } from '../../src/migration/stream.js';

const seedBase = Number(process.env.COLO_FUZZ_SEED ?? 20261127);
const iterations = Number(process.env.COLO_FUZZ_ITERATIONS ?? 30);
const memory = 16 * 1024 * 1024;
const region = '2M';

/** Codes a mutated stream may end with: each names what was wrong with it. */
const streamCodes = new Set([
  'STREAM_MAGIC', 'STREAM_VERSION', 'STREAM_TRUNCATED', 'STREAM_INCOMPLETE', 'FRAME_TYPE', 'FRAME_INVALID', 'FRAME_TOO_LARGE',
  'FRAME_ORDER', 'FRAME_CHECKSUM', 'FRAME_RANGE', 'STATE_WRONG_MODULE', 'STATE_INSTRUMENT', 'STATE_LAYOUT', 'STATE_DISK',
  'STATE_MEMORY', 'STATE_INVALID', 'RAM_DIGEST', 'MIGRATION_REFUSED', 'CHANNEL_CLOSED',
]);

function framesOf(stream: Buffer): Frame[] {
  const dec = new FrameDecoder();
  dec.push(stream);
  const frames: Frame[] = [];
  for (let f = dec.next(); f !== null; f = dec.next()) frames.push(f);
  dec.finish();
  return frames;
}

const frameTypes = Object.values(FrameType);

/** One seeded mutation of `frames`: the stream's bytes and what was done (for the failure message). */
function mutate(frames: readonly Frame[], seed: number): { bytes: Buffer; what: string } {
  const r = rng(Math.imul(seed, 2654435761));
  for (let i = 0; i < 8; i++) r(); // xorshift's first outputs of a small seed are small
  const pick = (n: number): number => Math.floor(r() * n);
  const fs2 = frames.map((f) => ({ type: f.type, flags: f.flags, payload: Buffer.from(f.payload) }));
  const k = pick(fs2.length);
  const f = fs2[k]!;
  const op = pick(9);
  let what: string;
  switch (op) {
    case 0: {
      const n = 1 + pick(4);
      for (let i = 0; i < n && f.payload.byteLength > 0; i++) f.payload[pick(f.payload.byteLength)] = pick(256);
      what = `${n} bytes changed in frame ${k}`;
      break;
    }
    case 1:
      f.payload = f.payload.subarray(0, pick(f.payload.byteLength));
      what = `frame ${k} cut to ${f.payload.byteLength} bytes`;
      break;
    case 2:
      fs2.splice(k, 1);
      what = `frame ${k} dropped`;
      break;
    case 3: {
      const j = pick(fs2.length);
      fs2.splice(k, 0, { ...fs2[j]! });
      what = `frame ${j} repeated at ${k}`;
      break;
    }
    case 4: {
      const text = f.payload.toString('latin1');
      const n = [0, 1, 2 ** 16, 2 ** 31, 2 ** 32 + 1, 2 ** 53 + 2, -1][pick(7)]!;
      f.payload = Buffer.from(text.replace(/\d+/, String(n)), 'latin1');
      what = `first number of frame ${k} set to ${n}`;
      break;
    }
    case 5: {
      const j = Math.min(k + 1, fs2.length - 1);
      [fs2[k], fs2[j]] = [fs2[j]!, fs2[k]!];
      what = `frames ${k} and ${j} swapped`;
      break;
    }
    case 6:
      f.type = frameTypes[pick(frameTypes.length)]!;
      what = `frame ${k} retyped to 0x${f.type.toString(16)}`;
      break;
    default:
      break;
  }
  const enc = new FrameEncoder();
  const parts = [encodePreamble()];
  for (const g of fs2) parts.push(...enc.frame(g.type, [g.payload], g.flags));
  let bytes = Buffer.concat(parts);
  if (op === 7) {
    const at = pick(bytes.byteLength);
    bytes = bytes.subarray(0, at);
    what = `stream cut at byte ${at}`;
  } else if (op === 8) {
    const at = pick(bytes.byteLength);
    bytes = Buffer.from(bytes);
    bytes[at] ^= 1 + pick(255);
    what = `byte ${at} changed (checksums not fixed)`;
  }
  return { bytes, what: what! };
}

let memwalkGuest: Awaited<ReturnType<typeof loadGuest>> | null = null;

/** A never-started memwalk machine as `colo run --memory 16M` makes one (store log on). */
async function freshMachine(serial: string): Promise<Machine> {
  memwalkGuest ??= await loadGuest(guests.memwalk, { storeLog: true });
  return Machine.create({
    guest: memwalkGuest,
    memoryBytesMax: memory,
    args: ['memwalk', region],
    env: [],
    serial: { kind: 'file', path: serial },
    drive: null,
  });
}

/** The outcome of one mutated stream: 'loaded'/'ran', or the error's code; throws on an untyped error. */
function codeOf(err: unknown, what: string): string {
  if (!(err instanceof ColoError)) throw new Error(`${what}: untyped error ${String((err as Error)?.stack ?? err)}`);
  assert.ok(streamCodes.has(err.code), `${what}: unexpected code ${err.code}: ${err.message}`);
  assert.ok(err.message.length > 0);
  return err.code;
}

test('a file: state mutated in many seeded ways loads or is refused with a typed error', async (t) => {
  const env = new TestEnv(t);
  const src = await env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '16M'], guestArgs: [region] });
  await src.waitSerial('B', { count: 3 });
  const file = env.file('vm.state');
  await src.qmp.execute('migrate', { uri: `file:${file}` });
  await src.waitMigrationStatus('completed');
  const frames = framesOf(fs.readFileSync(file));
  const outcomes = new Map<string, number>();
  const mutated = env.file('mutated.state');
  for (let i = 0; i < iterations; i++) {
    const seed = seedBase + i;
    const { bytes, what } = mutate(frames, seed);
    fs.writeFileSync(mutated, bytes);
    const m = await freshMachine(env.file('dst.serial'));
    let outcome: string;
    try {
      await withTimeout(loadMachineFromFile(m, mutated), 10000, `seed ${seed} (${what}) to load or fail`);
      outcome = 'loaded';
    } catch (err) {
      outcome = codeOf(err, `seed ${seed} (${what})`);
    } finally {
      await m.destroy();
    }
    outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1);
  }
  t.diagnostic(`outcomes: ${JSON.stringify(Object.fromEntries(outcomes))}`);
  assert.ok([...outcomes.keys()].some((k) => k !== 'loaded'), 'some mutations were refused');
});

/**
 * Records what a real source sends on the main channel of a plain (no multifd) migration:
 * a relay between the source and a real destination process.
 */
async function recordMigration(env: TestEnv): Promise<Buffer> {
  const src = await env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '16M'], guestArgs: [region] });
  const dst = await env.startVm({ name: 'dst', guest: guests.memwalk, args: ['--memory', '16M', '--incoming', 'defer'], guestArgs: [region] });
  await src.waitSerial('B', { count: 3 });
  const port = await dst.listenIncoming();
  const recorded: Buffer[] = [];
  const relay = net.createServer((a) => {
    const b = net.connect(port, '127.0.0.1');
    a.on('data', (d: Buffer) => recorded.push(Buffer.from(d)));
    a.pipe(b);
    b.pipe(a);
    a.on('error', () => b.destroy());
    b.on('error', () => a.destroy());
  });
  env.onCleanup(() => new Promise<void>((resolve) => relay.close(() => resolve())));
  await new Promise<void>((resolve) => relay.listen(0, '127.0.0.1', resolve));
  const relayPort = (relay.address() as net.AddressInfo).port;
  // Paused, so that every run records the same frames (a running guest makes the rounds vary).
  await src.qmp.execute('stop');
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${relayPort}` });
  await src.waitMigrationStatus('completed');
  await dst.waitMigrationStatus('completed');
  return Buffer.concat(recorded);
}

/** Feed `bytes` to an in-process destination; resolves with 'ran' or the failure's code. */
async function replay(m: Machine, bytes: Buffer, what: string): Promise<string> {
  const ended: { status: string; message: string }[] = [];
  let ran = false;
  const inc = new IncomingMigration(
    {
      machine: m,
      startRunning: async () => {
        ran = true;
      },
      event: () => undefined,
      ended: (status, message) => ended.push({ status, message }),
    },
    { host: '127.0.0.1', port: 0, capabilities: { multifd: false, 'x-colo': false, 'return-path': false, events: false } },
  );
  const socket = net.connect((await inc.listen()).port, '127.0.0.1');
  try {
    socket.on('error', () => undefined);
    socket.resume(); // the destination's replies
    await new Promise<void>((resolve) => socket.once('connect', resolve));
    socket.end(bytes);
    await waitFor(`the destination to finish with ${what}`, () => inc.core.finished && (ran || ended.length > 0), 10000);
    if (ran) {
      assert.equal(inc.core.stats.status, 'completed', `${what}: ran, so completed`);
      return 'ran';
    }
    assert.equal(ended.length, 1, `${what}: one ending: ${JSON.stringify(ended)}`);
    // An abort frame (a frame retyped to one) is a cancel.
    if (ended[0]!.status === 'cancelled') {
      assert.equal(inc.core.stats.status, 'cancelled');
      assert.match(ended[0]!.message, /^the source cancelled the migration/);
      return 'cancelled';
    }
    assert.equal(inc.core.stats.status, 'failed', `${what}: ${ended[0]!.message}`);
    const code = /\[([A-Z_]+)\]$/.exec(ended[0]!.message)?.[1];
    assert.ok(code !== undefined && streamCodes.has(code), `${what}: a typed error, not: ${ended[0]!.message}`);
    return code;
  } finally {
    socket.destroy();
    await inc.close();
  }
}

test('a recorded main-channel stream mutated in many seeded ways: the destination runs the guest or fails with a typed error, never hangs', async (t) => {
  const env = new TestEnv(t);
  const frames = framesOf(await recordMigration(env));
  assert.deepEqual([frames[0]!.type, frames.at(-1)!.type], [FrameType.hello, FrameType.switchover], 'a whole stream was recorded');
  const outcomes = new Map<string, number>();
  /** The first seed whose stream failed with a code that names what was wrong with it. */
  let failing: { seed: number; code: string } | undefined;
  for (let i = 0; i < iterations; i++) {
    const seed = seedBase + i;
    const { bytes, what } = mutate(frames, seed);
    const m = await freshMachine(env.file('dst.serial'));
    try {
      const outcome = await replay(m, bytes, `seed ${seed} (${what})`);
      outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1);
      if (failing === undefined && outcome !== 'ran' && outcome !== 'cancelled' && outcome !== 'CHANNEL_CLOSED') failing = { seed, code: outcome };
    } finally {
      await m.destroy();
    }
  }
  t.diagnostic(`outcomes: ${JSON.stringify(Object.fromEntries(outcomes))}`);
  assert.ok([...outcomes.keys()].some((k) => k !== 'ran'), 'some mutations were refused');

  // The same in a VM process that was told not to exit on a failed incoming migration: it
  // reports the failure with the same typed error and still answers QMP.
  assert.ok(failing !== undefined, 'a seed whose stream fails');
  const dst = await env.startVm({ name: 'dst2', guest: guests.memwalk, args: ['--memory', '16M', '--incoming', 'defer'], guestArgs: [region] });
  await dst.qmp.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0', 'exit-on-error': false });
  const r = await dst.qmp.execute<{ 'socket-address'?: { port: string }[] }>('query-migrate');
  const socket = net.connect(Number(r['socket-address']?.[0]?.port), '127.0.0.1');
  env.onCleanup(() => {
    socket.destroy();
  });
  socket.on('error', () => undefined);
  socket.resume();
  socket.end(mutate(frames, failing.seed).bytes);
  const info = await dst.waitMigrationStatus('failed', 15000);
  assert.ok(String(info['error-desc']).endsWith(`[${failing.code}]`), `seed ${failing.seed}: ${String(info['error-desc'])} names ${failing.code}`);
  assert.equal(typeof (await dst.status()), 'string', 'the destination still answers QMP');
  assert.ok(dst.alive);
});
