/**
 * WasiHost's cached views of guest memory (unit test; the vCPU hooks are a stub). The host
 * keeps one view and renews it only when an address lies beyond it or the memory detached it:
 * writes after the guest grew its memory must land in the memory, shared or not.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { WasiHost, diskFd, type VcpuHooks } from '../../src/machine/wasi-host.js';
import type { Disk } from '../../src/block/disk.js';
import { Nic } from '../../src/net/nic.js';
import { Clock } from '../../src/machine/devices/clock.js';
import { Serial } from '../../src/machine/devices/serial.js';
import { ProcExit } from '../../src/machine/wasi-abi.js';

const page = 65536;
const realtime = 0;

/** vCPU hooks that record the writes the host marks dirty and the output it emits. */
function stubHooks(writes: [number, number][], outputs: Uint8Array[] = []): VcpuHooks {
  return {
    finishRewind: () => false,
    pauseRequested: () => false,
    startUnwind() {
      throw new Error('not in this test');
    },
    drainInput() {},
    waitForInput: () => false,
    waitForDiskSpace: () => false,
    diskWriteDone() {},
    output(out) {
      if (out.kind === 'out') outputs.push(Uint8Array.from(out.bytes));
    },
    markWrite(ptr, len) {
      writes.push([ptr, len]);
    },
  };
}

function host(memory: WebAssembly.Memory, writes: [number, number][]): (name: string, ...args: (number | bigint)[]) => number {
  const hooks = stubHooks(writes);
  const clock = new Clock();
  clock.resume();
  const h = new WasiHost(memory, hooks, { clock, serial: new Serial(null), nic: new Nic(), disk: null }, ['guest'], []);
  const imports = h.imports() as unknown as Record<string, (...a: (number | bigint)[]) => number>;
  return (name, ...args) => imports[name]!(...args);
}

for (const shared of [false, true]) {
  test(`wasi host: host calls write into guest memory after it grew (${shared ? 'shared' : 'not shared'} memory)`, () => {
    const memory = new WebAssembly.Memory({ initial: 1, maximum: 4, ...(shared ? { shared: true } : {}) });
    const writes: [number, number][] = [];
    const call = host(memory, writes);
    assert.equal(call('clock_time_get', realtime, 0n, 16), 0);
    // Beyond the memory: refused, nothing written.
    assert.equal(call('clock_time_get', realtime, 0n, page + 16), 21 /* EFAULT */);
    memory.grow(1); // a memory that is not shared detaches the buffer the host saw
    assert.equal(call('clock_time_get', realtime, 0n, 24), 0);
    assert.equal(call('clock_time_get', realtime, 0n, page + 16), 0);
    const dv = new DataView(memory.buffer);
    const now = BigInt(Date.now()) * 1_000_000n;
    for (const at of [16, 24, page + 16]) {
      const t = dv.getBigUint64(at, true);
      assert.ok(t > now - 60_000_000_000n && t <= now + 60_000_000_000n, `the time at ${at} is the wall clock (${t})`);
    }
    assert.deepEqual(writes, [[16, 8], [24, 8], [page + 16, 8]]);
  });
}

test('wasi host: sock_recv and sock_send scatter and gather across iovecs, and refuse one outside memory', () => {
  const memory = new WebAssembly.Memory({ initial: 1, maximum: 1, shared: true });
  const writes: [number, number][] = [];
  const outputs: Uint8Array[] = [];
  const nic = new Nic();
  const hooks = stubHooks(writes, outputs);
  const clock = new Clock();
  clock.resume();
  const h = new WasiHost(memory, hooks, { clock, serial: new Serial(null), nic, disk: null }, ['guest'], []);
  const imports = h.imports() as unknown as Record<string, (...a: number[]) => number>;
  const call = (name: string, ...args: number[]): number => imports[name]!(...args);
  const dv = new DataView(memory.buffer);
  const u8 = new Uint8Array(memory.buffer);
  const enc = (s: string): Uint8Array => new TextEncoder().encode(s);
  const iovs = (at: number, list: [number, number][]): void => list.forEach(([p, l], i) => (dv.setUint32(at + 8 * i, p, true), dv.setUint32(at + 8 * i + 4, l, true)));
  const text = (p: number, n: number): string => new TextDecoder().decode(u8.subarray(p, p + n));

  let seq = 1;
  nic.enqueue({ seq: seq++, kind: 'open', conn: 9 });
  for (const s of ['hello', 'abcdefgh']) nic.enqueue({ seq: seq++, kind: 'data', conn: 9, bytes: enc(s) });
  while (nic.admitOne());
  assert.equal(call('sock_accept', 3, 0, 100), 0);
  const fd = dv.getUint32(100, true);

  // One iovec as large as the first chunk: that chunk.
  iovs(200, [[1000, 5]]);
  assert.equal(call('sock_recv', fd, 200, 1, 0, 300, 304), 0);
  assert.equal(dv.getUint32(300, true), 5);
  assert.equal(text(1000, 5), 'hello');
  // Two iovecs, 3 + 10 bytes: the next chunk (8) fills the first and part of the second.
  writes.length = 0;
  iovs(200, [[2000, 3], [3000, 10]]);
  assert.equal(call('sock_recv', fd, 200, 2, 0, 300, 304), 0);
  assert.equal(dv.getUint32(300, true), 8);
  assert.equal(text(2000, 3) + text(3000, 5), 'abcdefgh');
  assert.deepEqual(writes.slice(0, 2), [[2000, 3], [3000, 5]], 'each iovec written is marked dirty');
  // An iovec shorter than the chunk: the rest stays for the next read.
  nic.enqueue({ seq: seq++, kind: 'data', conn: 9, bytes: enc('xy') });
  nic.admitOne();
  iovs(200, [[4000, 1]]);
  assert.equal(call('sock_recv', fd, 200, 1, 0, 300, 304), 0);
  assert.equal(text(4000, 1), 'x');
  iovs(200, [[4000, 8]]);
  assert.equal(call('sock_recv', fd, 200, 1, 0, 300, 304), 0);
  assert.equal(dv.getUint32(300, true), 1);
  assert.equal(text(4000, 1), 'y');

  // Gather: two iovecs make one output, in order; a single one too.
  u8.set(enc('+OK'), 5000);
  u8.set(enc('\r\n'), 6000);
  iovs(200, [[5000, 3], [6000, 2]]);
  assert.equal(call('sock_send', fd, 200, 2, 0, 300), 0);
  assert.equal(dv.getUint32(300, true), 5);
  iovs(200, [[5000, 3]]);
  assert.equal(call('sock_send', fd, 200, 1, 0, 300), 0);
  u8.set(enc('---'), 5000); // the output is a copy, not a view of guest memory
  assert.deepEqual(outputs.map((o) => new TextDecoder().decode(o)), ['+OK\r\n', '+OK']);

  // An iovec beyond memory: EFAULT, nothing sent or consumed.
  iovs(200, [[5000, 3], [page - 2, 4]]);
  assert.equal(call('sock_send', fd, 200, 2, 0, 300), 21 /* EFAULT */);
  assert.equal(outputs.length, 2);
  nic.enqueue({ seq: seq++, kind: 'data', conn: 9, bytes: enc('zz') });
  nic.admitOne();
  assert.equal(call('sock_recv', fd, 200, 2, 0, 300, 304), 21 /* EFAULT */);
  iovs(200, [[4000, 8]]);
  assert.equal(call('sock_recv', fd, 200, 1, 0, 300, 304), 0);
  assert.equal(text(4000, 2), 'zz');
  // Chunks read together into one iovec: copied one after the other.
  for (const c of ['ab', 'cd']) nic.enqueue({ seq: seq++, kind: 'data', conn: 9, bytes: enc(c) });
  while (nic.admitOne());
  iovs(200, [[4000, 10]]);
  assert.equal(call('sock_recv', fd, 200, 1, 0, 300, 304), 0);
  assert.equal(dv.getUint32(300, true), 4);
  assert.equal(text(4000, 4), 'abcd');
});

test('wasi host: poll_oneoff admits one event at a time and reports the ready subscriptions in order', () => {
  const memory = new WebAssembly.Memory({ initial: 1, maximum: 1, shared: true });
  const nic = new Nic();
  const clock = new Clock();
  clock.resume();
  /** What arrives while poll_oneoff waits (once), or the wait is a test failure. */
  let arrives: (() => void) | null = null;
  let waits = 0;
  const hooks: VcpuHooks = {
    ...stubHooks([]),
    waitForInput() {
      if (arrives === null) throw new Error('poll_oneoff would wait: nothing ready and nothing pending');
      waits++;
      arrives();
      arrives = null;
      return false;
    },
  };
  const h = new WasiHost(memory, hooks, { clock, serial: new Serial(null), nic, disk: null }, ['guest'], []);
  const imports = h.imports() as unknown as Record<string, (...a: number[]) => number>;
  const call = (name: string, ...args: number[]): number => imports[name]!(...args);
  const dv = new DataView(memory.buffer);
  const enc = (s: string): Uint8Array => new TextEncoder().encode(s);
  const fdRead = 1;
  const fdWrite = 2;
  const subs = 1000;
  /** Subscriptions [userdata, type, fd]; returns the events as [userdata, error, type, nbytes, flags]. */
  let events = 4000;
  const poll = (list: [number, number, number][]): number[][] => {
    list.forEach(([ud, type, fd], i) => {
      const p = subs + 48 * i;
      for (let b = 0; b < 48; b += 4) dv.setUint32(p + b, 0, true);
      dv.setUint32(p, ud, true);
      dv.setUint8(p + 8, type);
      dv.setUint32(p + 16, fd, true);
    });
    assert.equal(call('poll_oneoff', subs, events, list.length, 3000), 0);
    const out: number[][] = [];
    for (let j = 0; j < dv.getUint32(3000, true); j++) {
      const p = events + 32 * j;
      out.push([dv.getUint32(p, true), dv.getUint16(p + 8, true), dv.getUint8(p + 10), Number(dv.getBigUint64(p + 16, true)), dv.getUint16(p + 24, true)]);
    }
    return out;
  };
  const recv = (fd: number): void => {
    dv.setUint32(200, 5000, true);
    dv.setUint32(204, 64, true);
    assert.equal(call('sock_recv', fd, 200, 1, 0, 300, 304), 0);
  };

  let seq = 1;
  for (const conn of [1, 2]) nic.enqueue({ seq: seq++, kind: 'open', conn });
  while (nic.admitOne());
  assert.equal(call('sock_accept', 3, 0, 100), 0);
  const fd1 = dv.getUint32(100, true);
  assert.equal(call('sock_accept', 3, 0, 100), 0);
  const fd2 = dv.getUint32(100, true);
  const watch: [number, number, number][] = [[10, fdRead, 3], [11, fdRead, fd1], [12, fdRead, fd2]];

  // Nothing ready: the first pending event is admitted, then the next; conn 2's data is what
  // makes a subscription ready. Conn 1's event was admitted on the way (its data waits).
  nic.enqueue({ seq: seq++, kind: 'data', conn: 1, bytes: enc('ab') });
  nic.enqueue({ seq: seq++, kind: 'data', conn: 2, bytes: enc('xyz') });
  nic.enqueue({ seq: seq++, kind: 'open', conn: 3 });
  assert.deepEqual(poll(watch.slice(2)), [[12, 0, fdRead, 3, 0]]);
  assert.equal(nic.admittedSeq, seq - 2, 'the open is still pending');
  // Ready ones are found without admitting anything: both connections now.
  assert.deepEqual(poll(watch), [[11, 0, fdRead, 2, 0], [12, 0, fdRead, 3, 0]]);
  assert.equal(nic.admittedSeq, seq - 2);
  recv(fd1);
  recv(fd2);
  // A new connection makes the listener ready.
  assert.deepEqual(poll(watch), [[10, 0, fdRead, 1, 0]]);
  assert.equal(call('sock_accept', 3, 0, 100), 0);
  // The client of conn 1 closes: a hang-up with 0 bytes.
  nic.enqueue({ seq: seq++, kind: 'close', conn: 1 });
  assert.deepEqual(poll(watch), [[11, 0, fdRead, 0, 1 /* hangup */]]);
  // Nothing pending: poll waits, and what arrives meanwhile is admitted and found.
  arrives = () => nic.enqueue({ seq: seq++, kind: 'data', conn: 2, bytes: enc('later') });
  assert.deepEqual(poll(watch.slice(2)), [[12, 0, fdRead, 5, 0]]);
  assert.equal(waits, 1);
  recv(fd2);
  // A free fd and a write subscription are ready at once, in subscription order.
  assert.deepEqual(poll([[12, fdRead, fd2], [20, fdRead, 77], [21, fdWrite, fd2]]), [[20, 8 /* EBADF */, fdRead, 0, 0], [21, 0, fdWrite, 65536, 0]]);
  // Events written over the subscriptions (in and out overlap): each event still carries its
  // subscription's userdata.
  events = subs + 24;
  assert.deepEqual(poll([[30, fdRead, 77], [31, fdRead, 78], [32, fdRead, 79]]), [[30, 8, fdRead, 0, 0], [31, 8, fdRead, 0, 0], [32, 8, fdRead, 0, 0]]);
  events = 4000;
  // A closed fd is free: EBADF.
  assert.equal(call('fd_close', fd1), 0);
  assert.deepEqual(poll([[11, fdRead, fd1]]), [[11, 8, fdRead, 0, 0]]);
});

test('wasi host: poll_oneoff refuses an unknown event tag and an unknown clock with EINVAL, waiting for nothing and writing no event', () => {
  const memory = new WebAssembly.Memory({ initial: 1, maximum: 1, shared: true });
  const clock = new Clock();
  clock.resume();
  const hooks: VcpuHooks = {
    ...stubHooks([]),
    waitForInput() {
      throw new Error('poll_oneoff waited instead of refusing the subscription');
    },
  };
  const h = new WasiHost(memory, hooks, { clock, serial: new Serial(null), nic: new Nic(), disk: null }, ['guest'], []);
  const imports = h.imports() as unknown as Record<string, (...a: number[]) => number>;
  const dv = new DataView(memory.buffer);
  const subs = 1000;
  const events = 4000;
  const sub = (i: number, ud: number, tag: number, idOrFd: number, timeoutNs = 0n): void => {
    const p = subs + 48 * i;
    for (let b = 0; b < 48; b += 4) dv.setUint32(p + b, 0, true);
    dv.setUint32(p, ud, true);
    dv.setUint8(p + 8, tag);
    dv.setUint32(p + 16, idOrFd, true);
    dv.setBigUint64(p + 24, timeoutNs, true);
  };
  const poll = (n: number): number => {
    dv.setUint32(3000, 0xdead, true);
    dv.setUint32(events, 0xbeef, true);
    return imports['poll_oneoff']!(subs, events, n, 3000);
  };
  // Tag 3 (no such event type) on the listener fd: it was echoed back as a ready event.
  sub(0, 7, 3, 3);
  assert.equal(poll(1), 28 /* EINVAL */);
  assert.equal(dv.getUint32(3000, true), 0xdead, 'no event count written');
  assert.equal(dv.getUint32(events, true), 0xbeef, 'no event written');
  // After a valid subscription too.
  sub(0, 8, 2 /* fd_write */, 1);
  sub(1, 9, 0xff, 1);
  assert.equal(poll(2), 28);
  assert.equal(dv.getUint32(3000, true), 0xdead);
  // Clock id 4 (none such): it was waited on as the monotonic clock (here 1 s, and the hook throws).
  sub(0, 10, 0 /* clock */, 4, 1_000_000_000n);
  assert.equal(poll(1), 28);
  assert.equal(dv.getUint32(3000, true), 0xdead);
  sub(0, 10, 0, 0x80000000, 0n);
  assert.equal(poll(1), 28);
  // The clocks there are still work: an expired monotonic timeout is an event.
  sub(0, 11, 0, 1 /* monotonic */, 0n);
  assert.equal(poll(1), 0);
  assert.equal(dv.getUint32(3000, true), 1);
  assert.equal(dv.getUint32(events, true), 11);
});

test('wasi host: sock_recv with ro_flags outside memory is EFAULT before it takes any data', () => {
  const memory = new WebAssembly.Memory({ initial: 1, maximum: 1, shared: true });
  const nic = new Nic();
  const clock = new Clock();
  clock.resume();
  const h = new WasiHost(memory, stubHooks([]), { clock, serial: new Serial(null), nic, disk: null }, ['guest'], []);
  const imports = h.imports() as unknown as Record<string, (...a: number[]) => number>;
  const call = (name: string, ...args: number[]): number => imports[name]!(...args);
  const dv = new DataView(memory.buffer);
  const u8 = new Uint8Array(memory.buffer);
  nic.enqueue({ seq: 1, kind: 'open', conn: 5 });
  nic.enqueue({ seq: 2, kind: 'data', conn: 5, bytes: new TextEncoder().encode('hello') });
  while (nic.admitOne());
  assert.equal(call('sock_accept', 3, 0, 100), 0);
  const fd = dv.getUint32(100, true);
  dv.setUint32(200, 1000, true);
  dv.setUint32(204, 16, true);
  dv.setUint32(300, 0xdead, true);
  for (const roFlags of [page - 1, page, 0xffffffff]) {
    assert.equal(call('sock_recv', fd, 200, 1, 0, 300, roFlags), 21 /* EFAULT */, `ro_flags at ${roFlags}`);
    assert.equal(dv.getUint32(300, true), 0xdead, 'no count written');
    assert.equal(u8[1000], 0, 'no data copied');
  }
  // The data is still there for a good call, which writes ro_flags 0.
  dv.setUint16(304, 0xffff, true);
  assert.equal(call('sock_recv', fd, 200, 1, 0, 300, 304), 0);
  assert.equal(dv.getUint32(300, true), 5);
  assert.equal(new TextDecoder().decode(u8.subarray(1000, 1005)), 'hello');
  assert.equal(dv.getUint16(304, true), 0);
  // fd_read on the connection has no ro_flags at all: it works.
  nic.enqueue({ seq: 3, kind: 'data', conn: 5, bytes: new TextEncoder().encode('again') });
  nic.admitOne();
  assert.equal(call('fd_read', fd, 200, 1, 300), 0);
  assert.equal(dv.getUint32(300, true), 5);
});

test('wasi host: proc_exit reports the exit code as WASI\'s u32', () => {
  const memory = new WebAssembly.Memory({ initial: 1, maximum: 1 });
  const clock = new Clock();
  const h = new WasiHost(memory, stubHooks([]), { clock, serial: new Serial(null), nic: new Nic(), disk: null }, ['guest'], []);
  const imports = h.imports() as unknown as Record<string, (...a: number[]) => number>;
  for (const [raw, code] of [[-1, 4294967295], [-2147483648, 2147483648], [3, 3]] as const) {
    assert.throws(() => imports['proc_exit']!(raw), (err: unknown) => {
      assert.ok(err instanceof ProcExit);
      assert.equal(err.code, code);
      return true;
    });
  }
});

test('wasi host: a disk read, write or sync that fails on the host (not for space) is EIO to the guest and reported, each one', () => {
  const memory = new WebAssembly.Memory({ initial: 1, maximum: 1, shared: true });
  const clock = new Clock();
  clock.resume();
  const reports: [string, boolean, string][] = [];
  let waitedForSpace = 0;
  const hooks: VcpuHooks = {
    ...stubHooks([]),
    waitForDiskSpace() {
      waitedForSpace++;
      return true;
    },
    reportIoError(operation, nospace, reason) {
      reports.push([operation, nospace, reason]);
    },
  };
  const fail = (code: string): never => {
    throw Object.assign(new Error(`${code}: injected, ${code === 'ENOSPC' ? 'write' : 'read'}`), { code });
  };
  /** The next error each operation throws (null: it works). */
  const next: { read: string | null; write: string | null; sync: string | null } = { read: null, write: null, sync: null };
  const disk = {
    sizeBytes: 65536,
    read(into: Uint8Array) {
      if (next.read !== null) fail(next.read);
      into.fill(7);
      return into.byteLength;
    },
    write(data: Uint8Array) {
      const code = next.write;
      if (code !== null) {
        if (code === 'ENOSPC') next.write = null; // room again at the retry
        fail(code);
      }
      return data.byteLength;
    },
    sync() {
      if (next.sync !== null) fail(next.sync);
    },
  } as unknown as Disk;
  const h = new WasiHost(memory, hooks, { clock, serial: new Serial(null), nic: new Nic(), disk }, ['guest'], []);
  const imports = h.imports() as unknown as Record<string, (...a: (number | bigint)[]) => number>;
  const dv = new DataView(memory.buffer);
  dv.setUint32(0, 100, true);
  dv.setUint32(4, 16, true);
  const pread = (): number => imports['fd_pread']!(diskFd, 0, 1, 0n, 8);
  const pwrite = (): number => imports['fd_pwrite']!(diskFd, 0, 1, 0n, 8);

  next.read = 'EIO';
  assert.equal(pread(), 29 /* EIO */);
  assert.equal(imports['fd_read']!(diskFd, 0, 1, 8), 29);
  next.write = 'EIO';
  assert.equal(pwrite(), 29);
  next.write = 'EROFS';
  assert.equal(imports['fd_write']!(diskFd, 0, 1, 8), 29);
  next.sync = 'EIO';
  assert.equal(imports['fd_sync']!(diskFd), 29);
  assert.deepEqual(reports.map(([op, nospace, reason]) => [op, nospace, reason.split(':')[0]]), [
    ['read', false, 'EIO'], ['read', false, 'EIO'], ['write', false, 'EIO'], ['write', false, 'EROFS'], ['write', false, 'EIO'],
  ]);
  assert.match(reports[0]![2], /injected/, 'the reason is the host error');
  assert.equal(waitedForSpace, 0);
  // A full filesystem is not reported so: the write waits for space (werror=enospc), and goes through.
  reports.length = 0;
  next.read = next.write = next.sync = null;
  next.write = 'ENOSPC';
  assert.equal(pwrite(), 0);
  assert.equal(dv.getUint32(8, true), 16);
  assert.equal(waitedForSpace, 1);
  assert.deepEqual(reports, []);
  // Working calls report nothing.
  assert.equal(pread(), 0);
  assert.equal(imports['fd_sync']!(diskFd), 0);
  assert.deepEqual(reports, []);
});
