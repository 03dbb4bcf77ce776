import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { guests, waitFor, withTimeout } from '../framework/harness.js';
import { machineFor, trapFlagAddr, trapGuest } from '../framework/machine.js';

test('a guest in a tight loop with no host calls pauses within 20 ms', async (t) => {
  const { m, serial } = await machineFor(t, guests.spin, []);
  await m.cont();
  await waitFor('spin to print its ready line', () => fs.readFileSync(serial, 'utf8').includes('spin ready'), 10000);
  const times: number[] = [];
  for (let i = 0; i < 10; i++) {
    await new Promise((r) => setTimeout(r, 30));
    const t0 = performance.now();
    await m.pause();
    times.push(performance.now() - t0);
    assert.equal(m.running, false);
    await m.cont();
  }
  times.sort((a, b) => a - b);
  t.diagnostic(`pause latency ms: ${times.map((x) => x.toFixed(2)).join(' ')}`);
  assert.ok(times[8]! < 20, `90th percentile pause latency ${times[8]!.toFixed(2)} ms is above 20 ms`);
  assert.ok(times[9]! < 100, `worst pause latency ${times[9]!.toFixed(2)} ms`);
});

test('pause, save and restore into a new machine continues the guest exactly', async (t) => {
  const { m: a, serial: serialA } = await machineFor(t, guests.memwalk, ['1M']);
  await a.cont();
  await waitFor('memwalk passes', () => (fs.readFileSync(serialA, 'latin1').match(/B/g)?.length ?? 0) >= 3, 10000);
  await a.pause();
  const state = await a.saveVcpu();
  const ramA = Buffer.from(a.ram());

  const { m: b, serial: serialB } = await machineFor(t, guests.memwalk, ['1M']);
  b.growRamTo(ramA.byteLength / 65536);
  b.ram().set(ramA);
  await b.restoreVcpu(state);
  assert.ok(Buffer.from(b.ram()).equals(ramA), 'restored RAM equals the saved RAM');
  await b.cont();
  // The same state loaded and started in one exchange (a COLO secondary's apply) runs too.
  const { m: c, serial: serialC } = await machineFor(t, guests.memwalk, ['1M']);
  c.growRamTo(ramA.byteLength / 65536);
  c.ram().set(ramA);
  const resumes: string[] = [];
  c.on('resume', () => resumes.push('resume'));
  await c.restoreVcpu(state, { run: true });
  assert.equal(c.running, true, 'running once restoreVcpu with run resolves');
  assert.deepEqual(resumes, ['resume']);
  await waitFor('memwalk restored and started at once to finish passes', () => (fs.readFileSync(serialC, 'latin1').match(/B/g)?.length ?? 0) >= 2, 10000);
  await c.pause();
  // A state the vCPU refuses is a RestoreError, and nothing runs.
  await assert.rejects(c.restoreVcpu({ ...state, globals: { ...state.globals, bogus: 1 } }, { run: true }), /unknown global bogus/);
  assert.equal(c.running, false);
  await waitFor('the restored memwalk to finish more passes', () => (fs.readFileSync(serialB, 'latin1').match(/B/g)?.length ?? 0) >= 2, 10000);
  await b.pause();
  const region = /memwalk start=0x([0-9a-f]+) size=(\d+)/.exec(fs.readFileSync(serialA, 'latin1'));
  assert.ok(region, 'memwalk printed its region');
  const start = parseInt(region[1]!, 16);
  const before = ramA[start]!;
  const after = Buffer.from(b.ram())[start]!;
  assert.notEqual(after, before, 'the restored guest kept incrementing its pages');
});

test('pauseAndSave stops the guest and returns the state saveVcpu then reads; the guest goes on from it', async (t) => {
  const { m, serial } = await machineFor(t, guests.memwalk, ['1M']);
  await m.cont();
  await waitFor('memwalk passes', () => (fs.readFileSync(serial, 'latin1').match(/B/g)?.length ?? 0) >= 2, 10000);
  const stops: string[] = [];
  m.on('stop', () => stops.push('stop'));
  const state = await m.pauseAndSave('paused');
  assert.equal(m.running, false);
  assert.deepEqual(stops, ['stop']);
  assert.ok(state !== null, 'a state came with the pause');
  assert.ok(state.started && !state.exited);
  assert.deepEqual(state, await m.saveVcpu(), 'the same state as a separate save');
  // Already paused: the state is read by a save.
  assert.deepEqual(await m.pauseAndSave('paused'), state);
  const passes = (fs.readFileSync(serial, 'latin1').match(/B/g) ?? []).length;
  await m.cont();
  await waitFor('memwalk to go on after the pause', () => (fs.readFileSync(serial, 'latin1').match(/B/g)?.length ?? 0) > passes, 10000);
});

test('restore refuses a state with a bad field and leaves the machine unchanged', async (t) => {
  const { m: a } = await machineFor(t, guests.memwalk, ['1M']);
  await a.cont();
  await new Promise((r) => setTimeout(r, 50));
  await a.pause();
  const state = await a.saveVcpu();
  const { m: b } = await machineFor(t, guests.memwalk, ['1M']);
  // A state whose guest (and colo's region above it) does not fit the memory: a restore
  // always comes after RAM has grown to the state's size.
  await assert.rejects(b.restoreVcpu(state), { name: 'RestoreError', code: 'STATE_MEMORY' });
  b.growRamTo(a.ramPages());
  const before = await b.saveVcpu();
  await assert.rejects(b.restoreVcpu({ ...state, nic: { ...state.nic, backlog: [42] } }), /nic.backlog\[0\]: unknown connection 42/);
  await assert.rejects(b.restoreVcpu({ ...state, globals: { ...state.globals, bogus: 1 } }), /unknown global bogus/);
  const after = await b.saveVcpu();
  assert.deepEqual(after, before, 'a refused restore changed nothing');
});

test('a guest whose saved call stack does not rewind is reported as crashed, not as exited', async (t) => {
  // A state whose RAM does not match its unwound call stack (the asyncify buffer) makes the
  // rewind miss its calls: _start then returns while still rewinding. That is a broken state,
  // never a guest that finished with code 0.
  const { m } = await machineFor(t, guests.memwalk, ['1M']);
  await m.cont();
  await new Promise((r) => setTimeout(r, 50));
  await m.pause();
  const base = m.region().asyncifyBase;
  const dv = new DataView(m.memory.buffer);
  const current = dv.getUint32(base, true);
  assert.ok(current > base + 8, 'the paused guest saved a call stack');
  new Uint8Array(m.memory.buffer).fill(0x7f, base + 8, current);
  const panicked = new Promise<string>((resolve) => m.once('panicked', resolve));
  let exited: number | null = null;
  m.once('shutdown', (code: number) => (exited = code));
  await m.cont();
  const message = await withTimeout(panicked, 5000, 'a panicked event (none came; a shutdown instead would be the bug)');
  assert.match(message, /did not rewind/);
  assert.equal(m.runState, 'guest-panicked');
  assert.equal(exited, null, 'no shutdown was reported');
});

test('two pauses at once (a QMP stop during a checkpoint\'s pause) share the vCPU\'s one answer; the one that saves gets the state, in either order', async (t) => {
  const { m, serial } = await machineFor(t, guests.spin, []);
  await m.cont();
  await waitFor('spin to print its ready line', () => fs.readFileSync(serial, 'utf8').includes('spin ready'), 10000);
  const stops: string[] = [];
  m.on('stop', () => stops.push('stop'));
  // Without sharing, the vCPU's one 'paused' answered the first and the second failed after
  // limits.pauseTimeoutMs: a rejection here fails the test.
  const [, colo] = await Promise.all([m.pause('paused'), m.pauseAndSave('colo')]);
  assert.equal(m.running, false);
  assert.ok(colo !== null, 'the checkpoint pause has the state');
  assert.ok(colo.started && !colo.exited);
  assert.equal(m.runState, 'colo', 'each pause sets its run state, in the order called');
  assert.deepEqual(stops, ['stop'], 'one STOP');

  await m.cont();
  const [first] = await Promise.all([m.pauseAndSave('colo'), m.pause('paused')]);
  assert.ok(first !== null, 'the checkpoint pause has the state');
  assert.equal(m.runState, 'paused');
  assert.deepEqual(stops, ['stop', 'stop']);
  await m.cont();
  assert.equal(m.running, true, 'the guest runs on');
});

test('a crashed guest stays in guest-panicked: a pause, with or without a save, returns no state and changes nothing; cont is refused', async (t) => {
  const { m } = await machineFor(t, trapGuest(t), []);
  const panicked = new Promise<string>((resolve) => m.once('panicked', resolve));
  const events: string[] = [];
  for (const e of ['resume', 'stop', 'panicked']) m.on(e, () => events.push(e));
  await m.cont();
  m.ram()[trapFlagAddr] = 1;
  assert.match(await withTimeout(panicked, 10000, 'the guest to trap'), /unreachable/);
  assert.equal(m.runState, 'guest-panicked');
  // QEMU's panic action pause: GUEST_PANICKED, then STOP (vm_stop); the VM is not running.
  assert.deepEqual(events, ['resume', 'panicked', 'stop']);
  assert.equal(await m.pauseAndSave('colo'), null, 'no state of a dead guest (a COLO checkpoint of it)');
  assert.equal(m.runState, 'guest-panicked', 'not overwritten by the pause');
  await m.pause('paused');
  assert.equal(m.runState, 'guest-panicked');
  await assert.rejects(m.cont(), { name: 'MachineError', code: 'VM_DEAD' });
  // Even with a run state that says it may run, the vCPU's refusal is an error, not a start.
  m.setRunState('paused');
  await assert.rejects(m.cont(), { name: 'MachineError', code: 'VM_DEAD' });
  assert.equal(m.running, false);
  assert.deepEqual(events, ['resume', 'panicked', 'stop'], 'no more run-state events after the crash');
});
