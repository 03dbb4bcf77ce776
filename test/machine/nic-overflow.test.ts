/**
 * The NIC's pending queue is bounded (limits.nicPendingEventsMax). On a lone VM or a primary the
 * front end's windows keep it below that; a COLO secondary's mirrored input is not windowed by
 * its own guest, so one that lags its primary (here: a guest that only polls a non-blocking
 * listener, admitting nothing) got more than the queue holds, and the vCPU's assertion killed
 * the guest. The rest now waits in the input ring and the main thread, as for a paused guest.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { machineFor, watGuest } from '../framework/machine.js';
import { sleep } from '../framework/harness.js';
import { limits } from '../../src/core/limits.js';

/**
 * fd 3 (the listener) non-blocking, then sock_accept on it for ever: every call takes the
 * input that reached the vCPU and admits none of it (nothing is ever accepted).
 */
function acceptSpinGuest(t: TestContext, name: string): string {
  return watGuest(t, name, `(module
    (import "wasi_snapshot_preview1" "fd_fdstat_set_flags" (func $setfl (param i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))
    (memory (export "memory") 1)
    (func (export "_start")
      (drop (call $setfl (i32.const 3) (i32.const 4)))
      (loop $spin
        (drop (call $accept (i32.const 3) (i32.const 0) (i32.const 64)))
        (br $spin))))`);
}

test('machine: input beyond the NIC queue\'s bound for a guest that admits none waits in the ring instead of killing the guest', async (t) => {
  const guest = acceptSpinGuest(t, 'acceptspin');
  const { m } = await machineFor(t, guest, []);
  const panics: string[] = [];
  m.on('panicked', (msg: string) => panics.push(msg));
  await m.cont();
  const total = limits.nicPendingEventsMax + 20000;
  const one = new Uint8Array([0x61]);
  m.injectInput({ seq: 1, kind: 'open', conn: 1 });
  for (let seq = 2; seq <= total; seq++) m.injectInput({ seq, kind: 'data', conn: 1, bytes: one });
  // The ring passes it to the vCPU in pieces; give it time to pass all of it (or to die).
  for (let i = 0; i < 40 && panics.length === 0; i++) await sleep(250);
  assert.deepEqual(panics, [], 'the guest lives');
  assert.equal(m.runState, 'running');
  await m.pause('paused');
  assert.equal(m.runState, 'paused', 'and pauses as asked');
});

test('machine: input waiting in the main thread is counted, and what a state loaded already has is dropped there at once (a COLO secondary\'s apply sheds its backlog)', async (t) => {
  const guest = acceptSpinGuest(t, 'acceptspin2');
  const { m } = await machineFor(t, guest, []);
  await m.cont();
  await m.pause('paused');
  const state = await m.saveVcpu();
  assert.equal(m.pendingInputBytes, 0);
  // A paused vCPU takes nothing: the ring fills, the rest waits here.
  const chunk = new Uint8Array(64 * 1024);
  const events = Math.ceil((limits.nicInputRingBytes * 1.5) / chunk.byteLength);
  m.injectInput({ seq: 1, kind: 'open', conn: 1 });
  for (let seq = 2; seq <= events + 1; seq++) m.injectInput({ seq, kind: 'data', conn: 1, bytes: chunk });
  await sleep(100);
  const waiting = m.pendingInputBytes;
  t.diagnostic(`${waiting} bytes wait in the main thread`);
  assert.ok(waiting >= limits.nicInputRingBytes / 3, `the ring's overflow is counted (${waiting})`);
  // A state that has all but the last 5 events (a checkpoint's, on a secondary).
  const lastSeq = events + 1 - 5;
  await m.restoreVcpu({ ...state, nic: { ...state.nic, lastSeq, admittedSeq: Math.min(state.nic.admittedSeq, lastSeq) } });
  assert.ok(m.pendingInputBytes <= 5 * (chunk.byteLength + limits.nicInputEventCharge), `only the events after the state's wait (${m.pendingInputBytes} bytes)`);
});
