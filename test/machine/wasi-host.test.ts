/**
 * WasiHost's cached views of guest memory (unit test; the vCPU hooks are a stub). The host
 * keeps one view and renews it only when an address lies beyond it or the memory detached it:
 * writes after the guest grew its memory must land in the memory, shared or not.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { WasiHost, type VcpuHooks } from '../../src/machine/wasi-host.js';
import { Nic } from '../../src/net/nic.js';
import { Clock } from '../../src/machine/devices/clock.js';
import { Serial } from '../../src/machine/devices/serial.js';

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
