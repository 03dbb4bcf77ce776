/**
 * The secondary's takeover (colo/driver.ts SecondaryDriver, the 'failover' action) on a
 * stand-in VM and session: what it says (status, COLO_EXIT, query-colo-status, log lines) when
 * the takeover cannot run the guest, when the guest exited meanwhile, and what `cont` does
 * while the takeover's disk commit waits for a full host filesystem.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { SecondaryDriver } from '../../src/colo/driver.js';
import { ColoController } from '../../src/colo/controller.js';
import { ChannelClosedError } from '../../src/core/errors.js';
import { MachineError } from '../../src/machine/machine.js';
import type { Vm } from '../../src/control/vm.js';
import type { IncomingSession } from '../../src/migration/session.js';
import { waitFor } from '../framework/harness.js';
import { captureLog } from '../framework/log.js';

/** What the driver uses of an IncomingSession before any checkpoint. */
class FakeSession {
  device: unknown = null;
  receiverFailure: Error | null = null;
  onFailure(): void {}
  nextFrame(): Promise<never> {
    return new Promise(() => undefined);
  }
  sendColo(): void {
    throw new ChannelClosedError('the channel was closed');
  }
  dropPageTarget(): void {}
  async destroy(): Promise<void> {}
}

/** A machine whose cont does what the test says: run, throw, or find the guest exited. */
class FakeMachine extends EventEmitter {
  runState = 'running';
  running = true;
  disk: { commitLayer(): number } | null = null;
  contFails: Error | null = null;
  setRunState(s: string): void {
    this.runState = s;
  }
  stopDirectOutput(): void {}
  async pause(next = 'paused'): Promise<void> {
    this.running = false;
    this.runState = next;
  }
  async cont(): Promise<void> {
    if (this.contFails !== null) throw this.contFails;
    this.running = true;
    this.runState = 'running';
  }
}

interface Rig {
  d: SecondaryDriver;
  m: FakeMachine;
  colo: ColoController;
  /** QMP events raised, as `NAME {data}`. */
  events: string[];
  /** Whether the front end was started (the VM serves). */
  serving: () => boolean;
}

/** A secondary in COLO between checkpoints (its start done), behind a real ColoController. */
function rig(t: TestContext, m: FakeMachine, frontEnd: () => Promise<void> = async () => undefined): Rig {
  const events: string[] = [];
  let serving = false;
  const vm = {
    machine: m,
    exiting: false,
    outputSink: null,
    migration: { coloHooks: {}, stats: null },
    event: (name: string, data?: Record<string, unknown>) => events.push(data === undefined ? name : `${name} ${JSON.stringify(data)}`),
    startFrontEnd: async () => {
      await frontEnd();
      serving = true;
    },
  };
  const colo = new ColoController(vm as unknown as Vm);
  const d = new SecondaryDriver(colo, new FakeSession() as unknown as IncomingSession, null, null);
  // The controller keeps its driver to itself; COLO is as after its start.
  Object.assign(colo, { driver: d, mode: 'secondary', lastMode: 'secondary' });
  d.core.phase = 'running';
  t.after(() => colo.close());
  return { d, m, colo, events, serving: () => serving };
}

const coloExits = (r: Rig): string[] => r.events.filter((e) => e.startsWith('COLO_EXIT'));

/**
 * A failover requested during an apply, now run: the guest stopped in state `runState` in the
 * relaunched apply's own run, so cont fails; lostHeartbeat's crash check is past.
 */
function takeoverAfterApply(t: TestContext, runState: string): { r: Rig; m: FakeMachine } {
  const m = new FakeMachine();
  m.running = false;
  m.runState = runState;
  m.contFails = new MachineError('VM_DEAD', `the guest is in state ${runState} and cannot run`);
  const r = rig(t, m);
  r.d.core.phase = 'applying';
  r.d.lostHeartbeat();
  void r.d.dispatch({ type: 'applied' });
  return { r, m };
}

test('colo secondary: a takeover whose guest cannot run (cont fails) says so: status failed, COLO_EXIT reason error, one error line naming the cause, not that the VM runs alone', async (t) => {
  const log = captureLog(t);
  // The guest crashed in the relaunched apply's own run (the failover waited for that apply).
  const { r, m } = takeoverAfterApply(t, 'guest-panicked');
  await waitFor('COLO to end on the secondary', () => coloExits(r).length > 0, 10000, 2);
  assert.deepEqual(coloExits(r), ['COLO_EXIT {"mode":"secondary","reason":"error"}']);
  assert.ok(r.events.includes('MIGRATION {"status":"failed"}') && !r.events.includes('MIGRATION {"status":"completed"}'), r.events.join('\n'));
  assert.deepEqual(r.colo.query(), { mode: 'none', 'last-mode': 'secondary', reason: 'error' });
  // As on a primary whose failover finds its guest crashed: query-status says what happened to it.
  assert.equal(m.runState, 'guest-panicked');
  assert.equal(m.running, false);
  assert.equal(r.serving(), false);
  const errors = log.filter((l) => / error /.test(l));
  assert.equal(errors.length, 1, log.join('\n'));
  assert.match(errors[0]!, /could not take over \(the guest is in state guest-panicked and cannot run\)/);
  assert.ok(!log.some((l) => /runs here alone/.test(l)), log.join('\n'));
});

test('colo secondary: a takeover whose front end fails (not a busy address) leaves the guest stopped and COLO ended with reason error', async (t) => {
  const log = captureLog(t);
  const m = new FakeMachine();
  const r = rig(t, m, async () => {
    throw new MachineError('VM_DEAD', 'the vCPU did not answer saveVcpu');
  });
  r.d.lostHeartbeat();
  await waitFor('COLO to end on the secondary', () => coloExits(r).length > 0, 10000, 2);
  assert.deepEqual(coloExits(r), ['COLO_EXIT {"mode":"secondary","reason":"error"}']);
  assert.equal(m.running, false, 'the guest does not run on where nothing serves it');
  assert.equal(m.runState, 'internal-error');
  assert.equal(log.filter((l) => / error /.test(l)).length, 1, log.join('\n'));
});

test('colo secondary: a clean takeover still completes: COLO_EXIT reason request, status completed, no warning or error', async (t) => {
  const log = captureLog(t);
  const m = new FakeMachine();
  const r = rig(t, m);
  r.d.lostHeartbeat();
  await waitFor('COLO to end on the secondary', () => coloExits(r).length > 0, 10000, 2);
  assert.deepEqual(coloExits(r), ['COLO_EXIT {"mode":"secondary","reason":"request"}']);
  assert.ok(r.events.includes('MIGRATION {"status":"completed"}'), r.events.join('\n'));
  assert.equal(m.runState, 'running');
  assert.equal(r.serving(), true);
  assert.deepEqual(log.filter((l) => / (warn|error) /.test(l)), []);
});

test('colo secondary: the guest exited in the relaunched apply\'s run: the takeover that finds it exited logs no error', async (t) => {
  const log = captureLog(t);
  const { r } = takeoverAfterApply(t, 'shutdown');
  await waitFor('the failover to end', () => r.d.core.phase === 'done', 10000, 2);
  assert.deepEqual(log.filter((l) => / (warn|error) /.test(l)), []);
  assert.ok(!log.some((l) => /runs here alone/.test(l)), log.join('\n'));
});
