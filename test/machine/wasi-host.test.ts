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

function host(memory: WebAssembly.Memory, writes: [number, number][]): (name: string, ...args: (number | bigint)[]) => number {
  const hooks: VcpuHooks = {
    finishRewind: () => false,
    pauseRequested: () => false,
    startUnwind() {
      throw new Error('not in this test');
    },
    drainInput() {},
    waitForInput() {
      return false;
    },
    waitForDiskSpace: () => false,
    diskWriteDone() {},
    output() {},
    markWrite(ptr, len) {
      writes.push([ptr, len]);
    },
  };
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
