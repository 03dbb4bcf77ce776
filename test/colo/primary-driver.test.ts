/**
 * The primary's driver (colo/driver.ts) on a stand-in migration session and VM: what reaches
 * the clients, which events and log lines come out, when the process exits, fails over, or
 * its guest can no longer run. The session answers as a secondary would when a test says so.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { PrimaryDriver, type DriverHost } from '../../src/colo/driver.js';
import { ColoController } from '../../src/colo/controller.js';
import { ChannelClosedError } from '../../src/core/errors.js';
import { FrameType, jsonPayload, type Frame } from '../../src/migration/stream.js';
import type { Vm } from '../../src/control/vm.js';
import { MachineError } from '../../src/machine/machine.js';
import type { SourceSession } from '../../src/migration/session.js';
import type { OutgoingMigration } from '../../src/migration/source.js';
import type { NicOutput } from '../../src/net/nic.js';
import { sleep, waitFor } from '../framework/harness.js';
import { limits } from '../../src/core/limits.js';
import { machineFor, trapFlagAddr, trapGuest } from '../framework/machine.js';
import { captureLog } from '../framework/log.js';

/** What the driver uses of a SourceSession; `sent` records the COLO messages it sent. */
class FakeSession {
  readonly sent: string[] = [];
  readonly opts = { host: '127.0.0.1' };
  readonly migrationId = null;
  failed: Error | null = null;
  private ending = false;
  private readonly frames: Frame[] = [];
  private waiter: { resolve: (f: Frame) => void; reject: (e: Error) => void } | null = null;
  private readonly listeners: ((err: Error) => void)[] = [];

  /** A COLO message from the secondary. */
  push(msg: string): void {
    const f: Frame = { type: FrameType.colo, flags: 0, seq: 0, payload: jsonPayload({ msg }) };
    const w = this.waiter;
    this.waiter = null;
    if (w !== null) w.resolve(f);
    else this.frames.push(f);
  }

  onFailure(l: (err: Error) => void): void {
    this.listeners.push(l);
  }
  nextColo(): Promise<Frame> {
    const f = this.frames.shift();
    if (f !== undefined) return Promise.resolve(f);
    if (this.failed !== null) return Promise.reject(this.failed);
    return new Promise((resolve, reject) => (this.waiter = { resolve, reject }));
  }
  /** Answer checkpoints as a secondary does. */
  answering = false;
  sendColo(v: { msg: string }): void {
    this.check();
    this.sent.push(v.msg);
    if (!this.answering) return;
    if (v.msg === 'CHECKPOINT_REQUEST') setImmediate(() => this.push('CHECKPOINT_REPLY'));
    if (v.msg === 'VMSTATE_SIZE') {
      setImmediate(() => {
        this.push('VMSTATE_RECEIVED');
        this.push('VMSTATE_LOADED');
      });
    }
  }
  sendColoNet(): void {
    this.check();
  }
  progress(): number {
    return this.sent.length;
  }
  captureCheckpoint(): boolean {
    return true;
  }
  async sendRound(): Promise<{ bytes: number; round: number; normalPages: number; zeroPages: number }> {
    await new Promise((r) => setTimeout(r, 1));
    this.check();
    return { bytes: 100, round: 1, normalPages: 1, zeroPages: 0 };
  }
  sendCapturedDeviceState(): number {
    return 10;
  }
  sendDeviceState(): number {
    return 10;
  }
  async destroy(err?: Error): Promise<void> {
    if (err !== undefined && this.failed === null) {
      this.failed = err;
      for (const l of this.listeners) l(err);
    }
    this.ending = true;
    const w = this.waiter;
    this.waiter = null;
    w?.reject(err ?? new ChannelClosedError('the channel was closed'));
  }
  private check(): void {
    if (this.ending || this.failed !== null) throw new ChannelClosedError('the channel was closed');
  }
}

/** A machine that pauses and runs at once (no guest). */
class FakeMachine extends EventEmitter {
  runState = 'finish-migrate';
  running = false;
  setRunState(s: string): void {
    this.runState = s;
  }
  async pauseAndSave(next: string): Promise<object | null> {
    this.running = false;
    this.runState = next;
    return {};
  }
  async saveVcpu(): Promise<object> {
    return {};
  }
  async cont(): Promise<void> {
    this.running = true;
    this.runState = 'running';
  }
}

interface Rig {
  d: PrimaryDriver;
  s: FakeSession;
  host: DriverHost & { closing: boolean };
  /** Output the clients received. */
  delivered: NicOutput[];
  /** QMP events (COLO_EXIT, MIGRATION) the driver raised through its host. */
  events: string[];
  /** Guest output, routed as Vm routes the machine's 'output' events. */
  pvmOutput(out: NicOutput): void;
}

/** What the driver (and ColoController) use of a Vm, with clients that record what they receive. */
function standInVm(machine: unknown, delayMs: number): Pick<Rig, 'delivered' | 'events' | 'pvmOutput'> & { vm: Vm } {
  const delivered: NicOutput[] = [];
  const events: string[] = [];
  const frontEnd = { deliver: (o: NicOutput) => delivered.push(o), deliveredBytes: () => 0, pauseReading: () => undefined, resumeReading: () => undefined };
  const vm = {
    machine,
    frontEnd,
    outputSink: null as ((o: NicOutput) => void) | null,
    inputTap: null,
    migration: { settings: { parameters: { 'x-checkpoint-delay': delayMs } }, stats: null },
    event: (name: string, data?: Record<string, unknown>) => events.push(data === undefined ? name : `${name} ${JSON.stringify(data)}`),
  };
  return { vm: vm as unknown as Vm, delivered, events, pvmOutput: (out) => (vm.outputSink !== null ? vm.outputSink(out) : frontEnd.deliver(out)) };
}

function rig(t: TestContext, machine: unknown = new FakeMachine(), delayMs = 100000): Rig {
  const { vm, delivered, events, pvmOutput } = standInVm(machine, delayMs);
  const host = {
    vm,
    closing: false,
    setStatus: (status: string) => events.push(`MIGRATION ${status}`),
    exited: (mode: string, reason: string) => events.push(`COLO_EXIT ${mode} ${reason}`),
  };
  const s = new FakeSession();
  const d = new PrimaryDriver(host, s as unknown as SourceSession);
  t.after(() => d.close());
  return { d, s, host, delivered, events, pvmOutput };
}

/**
 * As rig, but COLO starts as in a VM process: through the ColoController's hand-off hook, so
 * its counters() (query-migrate's x-colo entry) report on the driver. CHECKPOINT_READY came.
 */
async function controllerRig(t: TestContext): Promise<Rig & { colo: ColoController }> {
  const { vm, delivered, events, pvmOutput } = standInVm(new FakeMachine(), 100000);
  const colo = new ColoController(vm);
  t.after(() => colo.close());
  const s = new FakeSession();
  const handoff = vm.migration.coloHooks.onSourceHandoff;
  assert.ok(handoff !== undefined, 'the controller installed its hand-off hook');
  handoff(s as unknown as SourceSession, {} as OutgoingMigration);
  // The controller keeps its driver to itself; the test waits on the driver's phases.
  const d = (colo as unknown as { driver: PrimaryDriver }).driver;
  s.push('CHECKPOINT_READY');
  await waitFor('the primary to run in COLO', () => d.core.phase === 'running', 10000, 2);
  return { d, s, host: colo, delivered, events, pvmOutput, colo };
}

/** COLO started: CHECKPOINT_READY came and the PVM runs. */
async function started(r: Rig): Promise<void> {
  r.d.start();
  r.s.push('CHECKPOINT_READY');
  await waitFor('the primary to run in COLO', () => r.d.core.phase === 'running', 10000, 2);
}

const at = (level: string, lines: string[]): string[] => lines.filter((l) => l.split(' ')[2] === level);

const reply = (bytes: string, offset = 0): NicOutput => ({ kind: 'out', conn: 1, offset, bytes: Buffer.from(bytes) });
const text = (outs: NicOutput[]): string[] => outs.map((o) => (o.kind === 'out' ? Buffer.from(o.bytes).toString() : o.kind));

test('colo primary: at process exit output held for the SVM is dropped, and so is what the PVM still produces; a failover releases it', async (t) => {
  const exiting = rig(t);
  await started(exiting);
  exiting.pvmOutput(reply('PVM-only reply'));
  assert.equal(exiting.d.net.compare.held, 14, 'held for the SVM');
  exiting.host.closing = true;
  exiting.d.close(); // vm.destroy → colo.close
  exiting.pvmOutput(reply(' and more', 14)); // the machine runs until vm.destroy destroys it
  assert.deepEqual(text(exiting.delivered), [], 'the client receives nothing the SVM did not produce');
  assert.equal(exiting.d.net.compare.held, 0, 'nothing is held any more');

  const failing = rig(t);
  await started(failing);
  failing.pvmOutput(reply('PVM-only reply'));
  failing.d.lostHeartbeat();
  failing.pvmOutput(reply(' and more', 14)); // before the failover has resumed the PVM: after the held reply
  await waitFor('COLO_EXIT after the failover', () => failing.events.includes('COLO_EXIT primary request'), 10000, 2);
  assert.deepEqual(text(failing.delivered), ['PVM-only reply', ' and more'], 'the failover releases it, in order, once the PVM runs on: it is all there is now');
  failing.pvmOutput(reply(' and yet more', 23));
  assert.deepEqual(text(failing.delivered), ['PVM-only reply', ' and more', ' and yet more'], 'then the PVM serves directly');
});

test('colo primary: a guest crash ends COLO on the primary (one warn line, COLO_EXIT error), no checkpoint of the dead guest, held output dropped, the VM stays in guest-panicked', async (t) => {
  const log = captureLog(t);
  const { m } = await machineFor(t, trapGuest(t), []);
  m.setRunState('finish-migrate'); // as the initial migration leaves the source
  const r = rig(t, m, 1);
  r.s.answering = true;
  await started(r);
  await waitFor('checkpoints of the running guest', () => r.d.core.checkpoints >= 2, 20000, 2);
  // From here on no checkpoint completes: one that captured the PVM after the reply below and
  // reached VMSTATE_RECEIVED before the crash would release it, rightly (a loaded CI host made
  // that window wide enough). Answers already on their way arrive first.
  r.s.answering = false;
  await new Promise((resolve) => setTimeout(resolve, 20));
  r.pvmOutput(reply('PVM-only reply'));
  m.ram()[trapFlagAddr] = 1;
  await waitFor('COLO_EXIT after the guest crashed', () => r.events.some((e) => e.startsWith('COLO_EXIT')), 20000, 2);
  const requests = r.s.sent.filter((x) => x === 'CHECKPOINT_REQUEST').length;
  const checkpoints = r.d.core.checkpoints;
  await new Promise((resolve) => setTimeout(resolve, 100)); // the timer (1 ms) would have fired by now
  assert.equal(r.s.sent.filter((x) => x === 'CHECKPOINT_REQUEST').length, requests, 'no checkpoint is asked for any more');
  assert.equal(r.d.core.checkpoints, checkpoints);
  assert.equal(r.d.core.phase, 'done');
  assert.deepEqual(r.events.filter((e) => e.startsWith('COLO_EXIT')), ['COLO_EXIT primary error'], 'one COLO_EXIT');
  assert.equal(r.events.at(-2), 'MIGRATION completed');
  assert.equal(m.runState, 'guest-panicked', 'the VM stays stopped, as QEMU\'s panic action pause');
  assert.equal(m.running, false);
  assert.deepEqual(text(r.delivered), [], 'output the SVM never produced is not released');
  const warns = at('warn', log);
  assert.equal(warns.length, 1, warns.join('\n'));
  assert.match(warns[0]!, /COLO ended on the primary: its guest crashed \(.*unreachable.*\)/);
  assert.deepEqual(at('error', log), []);
  // Nothing brings it back: a heartbeat loss is no failover now.
  r.d.lostHeartbeat();
  assert.equal(r.d.core.phase, 'done');
  assert.equal(m.runState, 'guest-panicked');
});

/** A machine whose pause and resume wait until the test settles them. */
class SlowMachine extends FakeMachine {
  pausing: { resolve: (s: object) => void; reject: (e: Error) => void } | null = null;
  resuming: { resolve: () => void; reject: (e: Error) => void } | null = null;
  override pauseAndSave(): Promise<object | null> {
    return new Promise((resolve, reject) => (this.pausing = { resolve, reject }));
  }
  override cont(): Promise<void> {
    return new Promise<void>((resolve, reject) => (this.resuming = { resolve, reject })).then(() => {
      this.running = true;
      this.runState = 'running';
    });
  }
}

test('colo primary: closed mid-checkpoint (process exit), what fails or finishes afterwards is silent: no warning, no COLO_EXIT, no checkpoint', async (t) => {
  const log = captureLog(t);
  const destroyed = (): MachineError => new MachineError('VM_DESTROYED', 'the machine was destroyed');

  // In the checkpoint's pause: vm.destroy closes COLO, then the channels, then the machine
  // (which rejects the pause and any resume).
  const m = new SlowMachine();
  const r = rig(t, m, 1);
  r.d.start();
  r.s.push('CHECKPOINT_READY');
  await waitFor('the resume at COLO start', () => m.resuming !== null, 10000, 2);
  m.resuming!.resolve();
  r.s.answering = true;
  await waitFor('the checkpoint to pause the PVM', () => m.pausing !== null, 10000, 2);
  r.host.closing = true;
  r.d.close();
  await r.s.destroy();
  m.pausing!.reject(destroyed());
  m.cont = () => Promise.reject(destroyed());

  // Resuming at COLO start (the secondary has just answered): the resume completes after the
  // close, with the session still open; a timer armed then would ask for a checkpoint.
  const m2 = new SlowMachine();
  const r2 = rig(t, m2, 1);
  r2.d.start();
  r2.s.push('CHECKPOINT_READY');
  await waitFor('the resume at COLO start', () => m2.resuming !== null, 10000, 2);
  r2.host.closing = true;
  r2.d.close();
  m2.resuming!.resolve();
  const sent = [...r2.s.sent];

  await new Promise((resolve) => setTimeout(resolve, 100)); // a 1 ms timer, or the failures' handling, would have acted by now
  for (const x of [r, r2]) {
    assert.equal(x.d.core.phase, 'done');
    assert.equal(x.d.core.failoverState, 'none', 'no failover');
    assert.deepEqual(x.events.filter((e) => e.startsWith('COLO_EXIT') || e === 'MIGRATION completed'), [], 'no COLO_EXIT at process exit');
  }
  assert.deepEqual(r2.s.sent, sent, 'nothing sent after close (no checkpoint timer)');
  assert.deepEqual(at('warn', log), []);
  assert.deepEqual(at('error', log), []);
  assert.deepEqual(log.filter((l) => /COLO/.test(l)), [], 'not even an info line about COLO ending or a failover');
});

/** Start a checkpoint (a new x-checkpoint-delay takes one at once) and bring it to VMSTATE_RECEIVED, as an answering secondary would. */
async function toReceived(r: Rig): Promise<void> {
  const requests = r.s.sent.filter((x) => x === 'CHECKPOINT_REQUEST').length;
  r.d.dispatch({ type: 'delaySet' });
  await waitFor('CHECKPOINT_REQUEST', () => r.s.sent.filter((x) => x === 'CHECKPOINT_REQUEST').length === requests + 1, 10000, 2);
  r.s.push('CHECKPOINT_REPLY');
  await waitFor('the checkpoint to be sent', () => r.d.core.phase === 'awaitReceived', 10000, 2);
  r.s.push('VMSTATE_RECEIVED');
  await waitFor('VMSTATE_RECEIVED to be taken', () => r.d.core.phase === 'awaitLoaded', 10000, 2);
}

test('colo primary: PVM output of a new epoch waits for the SVM from VMSTATE_LOADED on: an apply longer than the compare timeout takes no timeout checkpoint', async (t) => {
  const r = rig(t);
  await started(r);
  await toReceived(r);
  // The SVM applies the checkpoint for longer than the compare's timeout; meanwhile the PVM,
  // running on, answers a request. The SVM cannot answer before it runs.
  r.pvmOutput(reply('+OK\r\n'));
  await sleep(limits.coloCompareTimeoutMs + 3 * limits.coloCompareScanMs);
  r.s.push('VMSTATE_LOADED');
  const loadedAt = performance.now();
  await waitFor('VMSTATE_LOADED to be taken', () => r.d.core.checkpoints === 1, 10000, 2);
  assert.deepEqual(r.d.core.checkpointsBy, { periodic: 1, mismatch: 0, timeout: 0, resync: 0 });
  assert.equal(r.s.sent.filter((x) => x === 'CHECKPOINT_REQUEST').length, 1, 'no checkpoint asked for by the apply\'s length');
  assert.equal(r.d.core.phase, 'running');
  assert.equal(r.d.net.compare.held, 5, 'the reply still waits for the SVM\'s copy');
  // The SVM runs now but never answers: past the timeout from here, the compare asks.
  await waitFor('a timeout checkpoint', () => r.s.sent.filter((x) => x === 'CHECKPOINT_REQUEST').length === 2, 10000, 2);
  const waited = performance.now() - loadedAt;
  assert.ok(waited >= limits.coloCompareTimeoutMs, `the timeout counts from VMSTATE_LOADED (asked after ${waited.toFixed(0)} ms)`);
  r.s.push('CHECKPOINT_REPLY');
  await waitFor('the checkpoint to be sent', () => r.d.core.phase === 'awaitReceived', 10000, 2);
  r.s.push('VMSTATE_RECEIVED');
  r.s.push('VMSTATE_LOADED');
  await waitFor('the timeout checkpoint to complete', () => r.d.core.checkpoints === 2, 10000, 2);
  assert.deepEqual(r.d.core.checkpointsBy, { periodic: 1, mismatch: 0, timeout: 1, resync: 0 });
  assert.deepEqual(text(r.delivered), ['+OK\r\n'], 'the checkpoint released the reply');
});

test('colo primary: a checkpoint that a failover cuts off after VMSTATE_RECEIVED is in query-migrate\'s x-colo counters, with its pause and size', async (t) => {
  const r = await controllerRig(t);
  r.pvmOutput(reply('+OK\r\n'));
  await toReceived(r);
  assert.deepEqual(text(r.delivered), ['+OK\r\n'], 'VMSTATE_RECEIVED released the output the checkpoint covers');
  // The secondary is declared lost while it applies; VMSTATE_LOADED never comes.
  r.colo.lostHeartbeat();
  await waitFor('COLO_EXIT after the failover', () => r.events.includes('COLO_EXIT {"mode":"primary","reason":"request"}'), 10000, 2);
  const x = r.colo.counters();
  const pick = (keys: string[]): Record<string, unknown> => Object.fromEntries(keys.map((k) => [k, x[k]]));
  assert.deepEqual(
    pick(['checkpoints', 'checkpoints-periodic', 'checkpoints-mismatch', 'checkpoints-timeout', 'checkpoints-resync', 'pause-samples', 'checkpoints-copied', 'checkpoints-sent-from-ram', 'last-checkpoint-bytes', 'mean-checkpoint-bytes', 'compare-checkpoint-released-bytes', 'failover-state']),
    {
      checkpoints: 1,
      'checkpoints-periodic': 1,
      'checkpoints-mismatch': 0,
      'checkpoints-timeout': 0,
      'checkpoints-resync': 0,
      'pause-samples': 1,
      'checkpoints-copied': 1,
      'checkpoints-sent-from-ram': 0,
      'last-checkpoint-bytes': 110, // the stand-in session's round (100) and device state (10)
      'mean-checkpoint-bytes': 110,
      'compare-checkpoint-released-bytes': 5,
      'failover-state': 'completed',
    },
  );
  assert.equal(x['last-pause-ms'], x['max-pause-ms'], 'its pause is the last and the longest');
});

test('colo primary: cont runs a PVM the user stopped, in turn with the checkpoints; refused, with QEMU\'s texts, while a checkpoint holds it and before COLO first ran it', async (t) => {
  const m = new FakeMachine();
  const r = rig(t, m);
  r.d.start();
  await assert.rejects(r.d.cont(), { name: 'QmpCommandError', message: 'Migration is not finalized yet' });
  assert.equal(m.running, false, 'the switchover\'s pause is COLO\'s to end');
  r.s.push('CHECKPOINT_READY');
  await waitFor('the primary to run in COLO', () => r.d.core.phase === 'running', 10000, 2);
  // A user stop, then cont: runs at once.
  m.running = false;
  m.runState = 'paused';
  await r.d.cont();
  assert.equal(m.running, true);
  assert.equal(m.runState, 'running');
  // A checkpoint holds it (run state colo): refused, left paused.
  m.running = false;
  m.runState = 'colo';
  await assert.rejects(r.d.cont(), { name: 'QmpCommandError', message: 'COLO checkpoint in progress' });
  assert.equal(m.running, false);
  assert.equal(m.runState, 'colo');
});

/** A machine that can be stopped, and whose cont throws what the test says. */
class FailingMachine extends FakeMachine {
  contFails: Error | null = null;
  async pause(next = 'paused'): Promise<void> {
    this.running = false;
    this.runState = next;
  }
  override async cont(): Promise<void> {
    if (this.contFails !== null) throw this.contFails;
    await super.cont();
  }
}

const coloExits = (r: Rig): string[] => r.events.filter((e) => e.startsWith('COLO_EXIT'));

test('colo primary: a failover whose PVM cannot run (cont fails) says so: status failed, COLO_EXIT reason error, one error line naming the cause, not that the VM runs unprotected', async (t) => {
  const log = captureLog(t);
  const m = new FailingMachine();
  const r = rig(t, m);
  await started(r);
  // Paused by a checkpoint when the secondary is declared lost; its vCPU then refuses to run.
  m.running = false;
  m.runState = 'colo';
  m.contFails = new MachineError('VM_DEAD', 'the vCPU thread died');
  r.pvmOutput(reply('PVM-only reply'));
  r.d.lostHeartbeat();
  await waitFor('COLO to end on the primary', () => coloExits(r).length > 0, 10000, 2);
  assert.deepEqual(coloExits(r), ['COLO_EXIT primary error']);
  assert.deepEqual(text(r.delivered), [], 'output held for the SVM is dropped: a secondary alive after all may still take over from its last checkpoint');
  assert.equal(r.d.net.compare.held, 0);
  assert.ok(r.events.includes('MIGRATION failed') && !r.events.includes('MIGRATION completed'), r.events.join('\n'));
  assert.equal(r.d.core.exitReason, 'error');
  assert.equal(m.running, false);
  assert.equal(m.runState, 'internal-error', 'not a state cont runs from');
  const errors = at('error', log);
  assert.equal(errors.length, 1, log.join('\n'));
  assert.match(errors[0]!, /could not go on alone after the failover \(the vCPU thread died\)/);
  assert.ok(!log.some((l) => /runs unprotected/.test(l)), log.join('\n'));
});

test('colo primary: a failover that finds its guest crashed (while it waited for the checkpoint in flight) ends COLO with reason error; the guest stays in guest-panicked', async (t) => {
  const log = captureLog(t);
  const m = new FailingMachine();
  const r = rig(t, m);
  await started(r);
  r.d.lostHeartbeat();
  // The crash comes after the failover started (the core ignores it then) and before it resumes the PVM.
  m.running = false;
  m.runState = 'guest-panicked';
  m.emit('panicked', 'unreachable executed');
  await waitFor('COLO to end on the primary', () => coloExits(r).length > 0, 10000, 2);
  assert.deepEqual(coloExits(r), ['COLO_EXIT primary error']);
  assert.ok(r.events.includes('MIGRATION failed'), r.events.join('\n'));
  assert.equal(m.runState, 'guest-panicked');
  const errors = at('error', log);
  assert.equal(errors.length, 1, log.join('\n'));
  assert.match(errors[0]!, /the guest is in state guest-panicked/);
});

test('colo primary: a failover whose front end cannot start leaves the guest stopped and COLO ended with reason error', async (t) => {
  const log = captureLog(t);
  const m = new FailingMachine();
  const r = rig(t, m);
  await started(r);
  Object.assign(r.host.vm, {
    frontEnd: null,
    startFrontEnd: async () => {
      throw new Error('listen EADDRINUSE: address already in use 127.0.0.1:5555');
    },
  });
  r.d.lostHeartbeat();
  await waitFor('COLO to end on the primary', () => coloExits(r).length > 0, 10000, 2);
  assert.deepEqual(coloExits(r), ['COLO_EXIT primary error']);
  assert.equal(m.running, false, 'the guest does not run on where nothing serves it');
  assert.equal(m.runState, 'internal-error');
  assert.equal(at('error', log).length, 1, log.join('\n'));
});

test('colo primary: a failover whose guest exited meanwhile, or that the process exit cuts off, logs no error and says nothing of running unprotected', async (t) => {
  const log = captureLog(t);
  const exited = new FailingMachine();
  const r = rig(t, exited);
  await started(r);
  exited.running = false;
  exited.runState = 'colo';
  // The guest exits while the failover waits; its cont then finds it so.
  exited.contFails = new MachineError('VM_DEAD', 'the guest is in state shutdown and cannot run');
  r.d.lostHeartbeat();
  exited.runState = 'shutdown';
  await waitFor('COLO to end on the primary', () => coloExits(r).length > 0, 10000, 2);
  assert.deepEqual(coloExits(r), ['COLO_EXIT primary request']);
  assert.ok(!log.some((l) => /runs unprotected/.test(l)), log.join('\n'));

  const closing = new FailingMachine();
  const r2 = rig(t, closing);
  await started(r2);
  closing.running = false;
  closing.runState = 'colo';
  closing.contFails = new MachineError('VM_DESTROYED', 'the machine was destroyed');
  r2.host.closing = true;
  r2.d.lostHeartbeat();
  await waitFor('the failover to end', () => r2.d.core.phase === 'done', 10000, 2);
  assert.deepEqual(at('error', log), []);
  assert.deepEqual(at('warn', log).filter((l) => !/COLO failover on the primary/.test(l)), []);
});

test('colo primary: a guest that exits by itself while a failover runs: its last output, held for the SVM, reaches the clients before the process ends', async (t) => {
  const log = captureLog(t);
  const m = new FailingMachine();
  const r = rig(t, m);
  await started(r);
  r.pvmOutput(reply('last reply'));
  r.d.lostHeartbeat();
  // proc_exit: the process waits for what guestExited says, then ends (close).
  m.running = false;
  m.runState = 'shutdown';
  await r.d.guestExited();
  r.host.closing = true;
  r.d.close();
  assert.deepEqual(text(r.delivered), ['last reply']);
  assert.deepEqual(at('error', log), []);
});

test('colo primary: once a failover begins nothing goes to the secondary any more while it waits (no mirrored input written to the closed channels, no compare scan); the held output is still released once the PVM runs', async (t) => {
  const log = captureLog(t);
  /** A PVM whose cont waits until the test lets it (a failover that waits, as for a checkpoint in flight). */
  class SlowCont extends FakeMachine {
    gate: Promise<void> | null = null;
    override async cont(): Promise<void> {
      if (this.gate !== null) await this.gate;
      await super.cont();
    }
  }
  const m = new SlowCont();
  const r = rig(t, m);
  await started(r);
  let letRun!: () => void;
  m.gate = new Promise<void>((resolve) => (letRun = resolve));
  t.after(() => letRun());
  m.running = false;
  m.runState = 'colo';
  let mirrorWrites = 0;
  r.s.sendColoNet = () => {
    mirrorWrites += 1;
    throw new ChannelClosedError('the channel was closed');
  };
  const compare = r.d.net.compare;
  let scans = 0;
  const check = compare.check.bind(compare);
  compare.check = (now: number) => {
    scans += 1;
    return check(now);
  };
  r.pvmOutput(reply('PVM-only reply'));
  r.d.lostHeartbeat();
  assert.equal(r.d.core.phase, 'failover');
  // Clients still send while the failover waits: the VM's input tap, as the front end calls it.
  const vm = r.host.vm as unknown as { inputTap: ((ev: unknown) => void) | null };
  for (let i = 0; i < 3; i++) {
    vm.inputTap?.({ seq: 100 + i, kind: 'data', conn: 1, bytes: Buffer.from('x') });
    await sleep(limits.coloCompareScanMs * 2);
  }
  assert.equal(mirrorWrites, 0, 'no mirrored input is written to the closed channels');
  assert.equal(scans, 0, 'the compare is not scanned any more (its triggers would do nothing)');
  assert.equal(compare.held, 14, 'the PVM output stays held until the PVM runs on');
  assert.deepEqual(log.filter((l) => /mirroring input/.test(l)), []);
  letRun();
  await waitFor('COLO_EXIT after the failover', () => r.events.includes('COLO_EXIT primary request'), 10000, 2);
  assert.deepEqual(text(r.delivered), ['PVM-only reply'], 'released once the PVM runs');
});
