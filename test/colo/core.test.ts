/**
 * The COLO state machines alone (colo/core.ts): one checkpoint in ARCHITECTURE §5's order, and
 * failover on either side — between checkpoints, in the middle of one, during the apply.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PrimaryCore, SecondaryCore, type PrimaryAction, type SecondaryAction } from '../../src/colo/core.js';

const types = (as: readonly (PrimaryAction | SecondaryAction)[]): string[] => as.filter((a) => a.type !== 'log').map((a) => (a.type === 'send' ? `send ${a.msg}` : a.type));

test('colo core: one checkpoint uses the seven messages in order on both sides', () => {
  const p = new PrimaryCore(() => 300);
  const s = new SecondaryCore();
  const sent: string[] = [];
  const note = (as: readonly (PrimaryAction | SecondaryAction)[]): string[] => {
    for (const a of as) if (a.type === 'send') sent.push(a.msg);
    return types(as);
  };
  assert.deepEqual(note(p.step({ type: 'handoff' })), ['status']);
  assert.deepEqual(note(s.step({ type: 'handoff' })), ['status', 'start']);
  sent.push('CHECKPOINT_READY'); // the start action sends it
  assert.deepEqual(note(s.step({ type: 'started' })), []);
  assert.deepEqual(note(p.step({ type: 'message', msg: 'CHECKPOINT_READY' })), ['resumeVm']);
  assert.deepEqual(note(p.step({ type: 'vmResumed' })), ['armTimer']);
  assert.deepEqual(note(p.step({ type: 'timer' })), ['send CHECKPOINT_REQUEST']);
  assert.deepEqual(note(s.step({ type: 'message', msg: 'CHECKPOINT_REQUEST' })), ['pauseVm']);
  assert.deepEqual(note(s.step({ type: 'vmPaused' })), ['send CHECKPOINT_REPLY']);
  assert.deepEqual(note(p.step({ type: 'message', msg: 'CHECKPOINT_REPLY' })), ['pauseVm']);
  assert.deepEqual(note(p.step({ type: 'vmPaused' })), ['send VMSTATE_SEND', 'sendState']);
  assert.deepEqual(note(s.step({ type: 'message', msg: 'VMSTATE_SEND' })), ['beginCheckpoint']);
  sent.push('VMSTATE_SIZE'); // sendState sends it before the device blob
  assert.deepEqual(note(s.step({ type: 'message', msg: 'VMSTATE_SIZE' })), []);
  assert.deepEqual(note(p.step({ type: 'stateSent' })), []);
  assert.deepEqual(note(s.step({ type: 'stateReceived' })), ['send VMSTATE_RECEIVED', 'apply']);
  assert.deepEqual(note(p.step({ type: 'message', msg: 'VMSTATE_RECEIVED' })), ['releaseHeld', 'resumeVm']);
  assert.deepEqual(note(s.step({ type: 'applied' })), ['send VMSTATE_LOADED']);
  assert.deepEqual(note(p.step({ type: 'message', msg: 'VMSTATE_LOADED' })), ['checkpointDone']);
  assert.deepEqual(note(p.step({ type: 'vmResumed' })), ['armTimer']);
  assert.deepEqual(sent, ['CHECKPOINT_READY', 'CHECKPOINT_REQUEST', 'CHECKPOINT_REPLY', 'VMSTATE_SEND', 'VMSTATE_SIZE', 'VMSTATE_RECEIVED', 'VMSTATE_LOADED']);
  assert.equal(p.checkpoints, 1);
  assert.deepEqual(p.checkpointsBy, { periodic: 1, mismatch: 0, timeout: 0, resync: 0 });
  assert.equal(s.checkpoints, 1);
  // The PVM resumes at VMSTATE_RECEIVED; when it runs before VMSTATE_LOADED comes, LOADED re-arms the timer.
  p.step({ type: 'timer' });
  p.step({ type: 'message', msg: 'CHECKPOINT_REPLY' });
  p.step({ type: 'vmPaused' });
  p.step({ type: 'stateSent' });
  p.step({ type: 'message', msg: 'VMSTATE_RECEIVED' });
  assert.deepEqual(note(p.step({ type: 'vmResumed' })), []);
  assert.deepEqual(note(p.step({ type: 'message', msg: 'VMSTATE_LOADED' })), ['checkpointDone', 'armTimer']);
  assert.equal(p.phase, 'running');
});

test('colo core: a new x-checkpoint-delay takes a checkpoint at once when the timer runs (as QEMU); in a checkpoint, or before the first, the next arming takes it', () => {
  let delay = 20000;
  const p = new PrimaryCore(() => delay);
  p.step({ type: 'handoff' });
  delay = 500;
  assert.deepEqual(p.step({ type: 'delaySet' }), [], 'before COLO runs: no timer to re-arm');
  p.step({ type: 'message', msg: 'CHECKPOINT_READY' });
  assert.deepEqual(p.step({ type: 'vmResumed' }), [{ type: 'armTimer', ms: 500 }], 'the first arming has the delay set before it');
  delay = 100;
  assert.deepEqual(p.step({ type: 'delaySet' }), [{ type: 'send', msg: 'CHECKPOINT_REQUEST' }], 'a checkpoint now');
  assert.equal(p.phase, 'requested');
  p.step({ type: 'message', msg: 'CHECKPOINT_REPLY' });
  delay = 60000;
  assert.deepEqual(p.step({ type: 'delaySet' }), [], 'in a checkpoint: nothing more');
  p.step({ type: 'vmPaused' });
  p.step({ type: 'stateCaptured' });
  p.step({ type: 'stateSent' });
  p.step({ type: 'vmResumed' });
  p.step({ type: 'message', msg: 'VMSTATE_RECEIVED' });
  assert.deepEqual(
    p.step({ type: 'message', msg: 'VMSTATE_LOADED' }).filter((a) => a.type !== 'checkpointDone'),
    [{ type: 'armTimer', ms: 60000 }],
    'the checkpoint ends with the newest delay',
  );
  assert.deepEqual(p.checkpointsBy, { periodic: 1, mismatch: 0, timeout: 0, resync: 0 });
});

/** A primary in COLO between checkpoints: CHECKPOINT_READY came, its PVM resumed, the timer armed. */
function runningPrimary(delayMs = 300): PrimaryCore {
  const p = new PrimaryCore(() => delayMs);
  p.step({ type: 'handoff' });
  p.step({ type: 'message', msg: 'CHECKPOINT_READY' });
  assert.deepEqual(types(p.step({ type: 'vmResumed' })), ['armTimer']);
  return p;
}

/** A secondary in COLO between checkpoints: its start done, its SVM running. */
function runningSecondary(): SecondaryCore {
  const s = new SecondaryCore();
  s.step({ type: 'handoff' });
  s.step({ type: 'started' });
  assert.equal(s.phase, 'running');
  return s;
}

/** A primary whose first checkpoint was just answered by CHECKPOINT_REPLY (the PVM is being paused). */
function replied(): PrimaryCore {
  const p = runningPrimary();
  p.step({ type: 'timer' });
  p.step({ type: 'message', msg: 'CHECKPOINT_REPLY' });
  assert.equal(p.phase, 'pausing');
  return p;
}

test('colo core: a captured checkpoint lets the PVM run on before the secondary has it; the messages stay in order', () => {
  const p = replied();
  assert.deepEqual(types(p.step({ type: 'vmPaused' })), ['send VMSTATE_SEND', 'sendState']);
  assert.deepEqual(types(p.step({ type: 'stateCaptured' })), ['resumeVm'], 'the PVM resumes as soon as its state is copied');
  assert.deepEqual(types(p.step({ type: 'stateCaptured' })), [], 'once');
  assert.deepEqual(types(p.step({ type: 'vmResumed' })), [], 'running again, but the checkpoint is still in flight');
  assert.equal(p.phase, 'sending');
  assert.deepEqual(types(p.step({ type: 'stateSent' })), []);
  assert.deepEqual(types(p.step({ type: 'message', msg: 'VMSTATE_RECEIVED' })), ['releaseHeld'], 'no second resume');
  assert.deepEqual(types(p.step({ type: 'message', msg: 'VMSTATE_LOADED' })), ['checkpointDone', 'armTimer']);
  assert.equal(p.phase, 'running');
  // The resume may still be under way at VMSTATE_LOADED: the timer waits for it.
  p.step({ type: 'timer' });
  p.step({ type: 'message', msg: 'CHECKPOINT_REPLY' });
  p.step({ type: 'vmPaused' });
  p.step({ type: 'stateCaptured' });
  p.step({ type: 'stateSent' });
  p.step({ type: 'message', msg: 'VMSTATE_RECEIVED' });
  assert.deepEqual(types(p.step({ type: 'message', msg: 'VMSTATE_LOADED' })), ['checkpointDone']);
  assert.deepEqual(types(p.step({ type: 'vmResumed' })), ['armTimer']);
  // A failover with the PVM already running again: the primary goes on alone.
  p.step({ type: 'timer' });
  p.step({ type: 'message', msg: 'CHECKPOINT_REPLY' });
  p.step({ type: 'vmPaused' });
  p.step({ type: 'stateCaptured' });
  p.step({ type: 'vmResumed' });
  assert.deepEqual(types(p.step({ type: 'lostHeartbeat' })), ['failover']);
  assert.equal(p.checkpoints, 2);
});

test('colo core: compare triggers start a checkpoint when running, wait after VMSTATE_RECEIVED, fold into one in flight; a resync always takes the next', () => {
  const p = new PrimaryCore(() => 100);
  const kinds = (acts: { type: string; msg?: string }[]): string[] => acts.map((a) => (a.msg !== undefined ? `${a.type} ${a.msg}` : a.type));
  /** The requested checkpoint, from CHECKPOINT_REPLY to VMSTATE_LOADED. */
  const completeCheckpoint = (): void => {
    p.step({ type: 'message', msg: 'CHECKPOINT_REPLY' });
    p.step({ type: 'vmPaused' });
    p.step({ type: 'stateSent' });
    p.step({ type: 'message', msg: 'VMSTATE_RECEIVED' });
    p.step({ type: 'message', msg: 'VMSTATE_LOADED' });
  };
  p.step({ type: 'handoff' });
  // Before the first checkpoint (SVM not yet ready): remembered.
  assert.deepEqual(kinds(p.step({ type: 'trigger', reason: 'timeout' })), []);
  p.step({ type: 'message', msg: 'CHECKPOINT_READY' });
  assert.deepEqual(kinds(p.step({ type: 'vmResumed' })), ['send CHECKPOINT_REQUEST'], 'a remembered trigger starts a checkpoint at once');
  // In flight before VMSTATE_RECEIVED: the checkpoint covers it.
  assert.deepEqual(kinds(p.step({ type: 'trigger', reason: 'mismatch' })), []);
  p.step({ type: 'message', msg: 'CHECKPOINT_REPLY' });
  p.step({ type: 'vmPaused' });
  p.step({ type: 'stateSent' });
  p.step({ type: 'message', msg: 'VMSTATE_RECEIVED' });
  // After VMSTATE_RECEIVED the compare is in a new epoch: this one needs the next checkpoint.
  assert.deepEqual(kinds(p.step({ type: 'trigger', reason: 'mismatch' })), []);
  p.step({ type: 'message', msg: 'VMSTATE_LOADED' });
  assert.deepEqual(p.checkpointsBy, { periodic: 0, mismatch: 0, timeout: 1, resync: 0 });
  assert.deepEqual(kinds(p.step({ type: 'vmResumed' })), ['send CHECKPOINT_REQUEST']);
  completeCheckpoint();
  assert.deepEqual(p.checkpointsBy, { periodic: 0, mismatch: 1, timeout: 1, resync: 0 });
  assert.deepEqual(kinds(p.step({ type: 'vmResumed' })), ['armTimer']);
  assert.deepEqual(kinds(p.step({ type: 'trigger', reason: 'mismatch' })), ['send CHECKPOINT_REQUEST'], 'running: at once');

  // Lost mirrored input (resync) is not covered by the checkpoint in flight, even before
  // VMSTATE_RECEIVED: the next one is taken, and counted as resync over a remembered trigger.
  p.step({ type: 'message', msg: 'CHECKPOINT_REPLY' });
  p.step({ type: 'vmPaused' });
  assert.deepEqual(kinds(p.step({ type: 'trigger', reason: 'resync' })), []);
  p.step({ type: 'stateSent' });
  p.step({ type: 'message', msg: 'VMSTATE_RECEIVED' });
  assert.deepEqual(kinds(p.step({ type: 'trigger', reason: 'timeout' })), []);
  p.step({ type: 'message', msg: 'VMSTATE_LOADED' });
  assert.deepEqual(kinds(p.step({ type: 'vmResumed' })), ['send CHECKPOINT_REQUEST']);
  completeCheckpoint();
  assert.deepEqual(p.checkpointsBy, { periodic: 0, mismatch: 2, timeout: 1, resync: 1 });
  assert.deepEqual(kinds(p.step({ type: 'vmResumed' })), ['armTimer']);
  assert.deepEqual(kinds(p.step({ type: 'trigger', reason: 'resync' })), ['send CHECKPOINT_REQUEST'], 'running: at once');
});

/** A secondary receiving its first checkpoint (VMSTATE_SEND came). */
function receiving(): SecondaryCore {
  const s = runningSecondary();
  s.step({ type: 'message', msg: 'CHECKPOINT_REQUEST' });
  s.step({ type: 'vmPaused' });
  s.step({ type: 'message', msg: 'VMSTATE_SEND' });
  assert.equal(s.phase, 'receiving');
  return s;
}

/** A secondary in the middle of applying its first checkpoint. */
function applying(): SecondaryCore {
  const s = receiving();
  s.step({ type: 'stateReceived' });
  assert.equal(s.phase, 'applying');
  return s;
}

test('colo core: a failover during the apply waits for it (relaunch), then runs', () => {
  const s = applying();
  assert.deepEqual(types(s.step({ type: 'lostHeartbeat' })), []);
  assert.equal(s.failoverState, 'relaunch');
  assert.deepEqual(types(s.step({ type: 'applied' })), ['failover']);
  assert.equal(s.failoverState, 'active');
  assert.deepEqual(types(s.step({ type: 'failoverDone' })), ['status', 'exit']);
  assert.equal(s.failoverState, 'completed');
  assert.equal(s.exitReason, 'request');
});

test('colo core: a COLO start that fails closes the link and leaves the secondary able to take over, also for a failover that waited for it', () => {
  // Asked after the failed start.
  const a = new SecondaryCore();
  assert.deepEqual(types(a.step({ type: 'handoff' })), ['status', 'start']);
  assert.deepEqual(types(a.step({ type: 'startFailed', message: 'the vCPU is gone' })), ['closeLink']);
  assert.equal(a.phase, 'running');
  assert.deepEqual(types(a.step({ type: 'lostHeartbeat' })), ['failover']);
  assert.deepEqual(types(a.step({ type: 'failoverDone' })), ['status', 'exit']);
  assert.equal(a.failoverState, 'completed');
  // Asked while the start ran: it waited (require, as QEMU's before its COLO thread picks the
  // request up: no apply is under way to relaunch after), and runs once the start has failed.
  const b = new SecondaryCore();
  b.step({ type: 'handoff' });
  assert.deepEqual(types(b.step({ type: 'lostHeartbeat' })), []);
  assert.equal(b.failoverState, 'require');
  assert.deepEqual(types(b.step({ type: 'startFailed', message: 'the vCPU is gone' })), ['closeLink', 'failover']);
  assert.equal(b.failoverState, 'active');
  // Only a start in progress can fail.
  assert.deepEqual(types(b.step({ type: 'startFailed', message: 'late' })), []);
  // Asked while a start ran that then succeeds: require, then active once it is started.
  const c = new SecondaryCore();
  c.step({ type: 'handoff' });
  c.step({ type: 'lostHeartbeat' });
  assert.equal(c.failoverState, 'require');
  assert.deepEqual(types(c.step({ type: 'started' })), ['failover']);
  assert.equal(c.failoverState, 'active');
  assert.equal(c.exitReason, 'request');
});

test('colo core: an apply that breaks off leaves COLO for good; a failover that waited for it is refused, later ones too', () => {
  for (const waiting of [false, true]) {
    const s = applying();
    if (waiting) s.step({ type: 'lostHeartbeat' });
    const out = s.step({ type: 'applyFailed', message: 'ENOSPC' });
    assert.deepEqual(types(out), ['closeLink', 'status', 'abandon']);
    assert.deepEqual(out.find((a) => a.type === 'status'), { type: 'status', status: 'failed' });
    const line = out.find((a) => a.type === 'log');
    assert.equal(line?.type === 'log' && line.level, 'error');
    assert.equal(s.phase, 'done');
    assert.equal(s.exitReason, 'error');
    assert.equal(s.failoverState, 'none');
    // Nothing brings it back: no takeover, no apply, no checkpoint.
    assert.deepEqual(types(s.step({ type: 'lostHeartbeat' })), []);
    assert.deepEqual(types(s.step({ type: 'applied' })), []);
    assert.deepEqual(types(s.step({ type: 'message', msg: 'CHECKPOINT_REQUEST' })), []);
  }
});

test('colo core: the rest of a checkpoint that comes after a channel broke is never applied', () => {
  const s = receiving();
  // A multifd channel closed before its SYNC: the barrier failed; the main channel still
  // delivers VMSTATE_SIZE and the device blob.
  s.step({ type: 'linkLost', message: 'multifd channel 1 closed' });
  assert.deepEqual(types(s.step({ type: 'message', msg: 'VMSTATE_SIZE' })), []);
  const late = s.step({ type: 'stateReceived' });
  assert.deepEqual(types(late), [], 'no VMSTATE_RECEIVED, no apply');
  assert.equal(s.phase, 'receiving');
  assert.deepEqual(types(s.step({ type: 'message', msg: 'CHECKPOINT_REQUEST' })), [], 'no new checkpoint either');
  // The takeover drops the partial checkpoint.
  assert.deepEqual(types(s.step({ type: 'lostHeartbeat' })), ['failover']);
  assert.equal(s.checkpoints, 0);
});

test('colo core: after a protocol error mid-checkpoint the secondary applies none of it; after a channel broke it starts no checkpoint', () => {
  // A corrupt page on a multifd channel: the link is closed, but the main channel's frames
  // queued behind it still end the checkpoint. It holds a page that cannot be trusted.
  const s = receiving();
  assert.deepEqual(types(s.step({ type: 'protocolError', message: 'bad page checksum', corrupt: true })), ['closeLink']);
  assert.deepEqual(types(s.step({ type: 'stateReceived' })), [], 'no VMSTATE_RECEIVED, no apply of a corrupt checkpoint');
  assert.equal(s.phase, 'receiving');
  assert.deepEqual(types(s.step({ type: 'protocolError', message: 'the same failure, seen again' })), [], 'the link is closed once');
  assert.deepEqual(types(s.step({ type: 'lostHeartbeat' })), ['failover']);
  assert.equal(s.checkpoints, 0);

  // Between checkpoints a multifd channel breaks; the main channel still brings a
  // CHECKPOINT_REQUEST. Pausing the SVM for a checkpoint that cannot arrive whole would leave
  // the only copy that can take over stopped.
  const r = runningSecondary();
  assert.deepEqual(types(r.step({ type: 'linkLost', message: 'multifd channel 1 closed' })), []);
  assert.deepEqual(types(r.step({ type: 'message', msg: 'CHECKPOINT_REQUEST' })), [], 'no pauseVm');
  assert.equal(r.phase, 'running');
  assert.deepEqual(types(r.step({ type: 'lostHeartbeat' })), ['failover']);

  // Checkpoint state (pages, device blob) without VMSTATE_SEND: the SVM runs, and the cache may
  // hold a part of something. It is a broken stream, never applied.
  const u = runningSecondary();
  assert.deepEqual(types(u.step({ type: 'stateReceived' })), ['closeLink'], 'no VMSTATE_RECEIVED, no apply');
  assert.equal(u.phase, 'running');
  assert.equal(u.checkpoints, 0);
});

test('colo core: a channel that breaks while the SVM pauses for a checkpoint: no CHECKPOINT_REPLY, the SVM runs on', () => {
  // A multifd channel breaks after CHECKPOINT_REQUEST came, before the SVM's pause ends; the
  // main channel lives. A reply would make the primary pause its PVM for a checkpoint that cannot
  // arrive whole (one it cannot copy stays paused until the grace period ends), and the SVM,
  // the copy that can take over, would stay stopped.
  const s = runningSecondary();
  assert.deepEqual(types(s.step({ type: 'message', msg: 'CHECKPOINT_REQUEST' })), ['pauseVm']);
  assert.deepEqual(types(s.step({ type: 'linkLost', message: 'multifd channel 1 closed' })), []);
  assert.deepEqual(types(s.step({ type: 'vmPaused' })), ['resumeVm'], 'no CHECKPOINT_REPLY');
  assert.equal(s.phase, 'running');
  assert.deepEqual(types(s.step({ type: 'message', msg: 'VMSTATE_SEND' })), [], 'no checkpoint starts');
  assert.deepEqual(types(s.step({ type: 'lostHeartbeat' })), ['failover']);
  assert.equal(s.checkpoints, 0);
});

test('colo core: a failover mid-checkpoint before the apply drops the checkpoint; a broken link waits for the heartbeat', () => {
  const s = receiving();
  assert.deepEqual(types(s.step({ type: 'linkLost', message: 'yanked' })), [], 'a secondary does not arm a self-promotion');
  assert.deepEqual(types(s.step({ type: 'lostHeartbeat' })), ['failover']);
  // Late frames of the dropped checkpoint change nothing.
  assert.deepEqual(types(s.step({ type: 'stateReceived' })), []);
  assert.deepEqual(types(s.step({ type: 'failoverDone' })), ['status', 'exit']);
  assert.equal(s.checkpoints, 0);

  const p = replied();
  assert.deepEqual(types(p.step({ type: 'linkLost', message: 'yanked' })), ['armGrace']);
  assert.deepEqual(types(p.step({ type: 'graceElapsed' })), ['failover']);
  assert.deepEqual(types(p.step({ type: 'lostHeartbeat' })), []);
  assert.deepEqual(types(p.step({ type: 'failoverDone' })), ['status', 'exit']);
  assert.equal(p.exitReason, 'error');
  // An unexpected message is a protocol error: failover with reason error.
  const q = new PrimaryCore(() => 300);
  q.step({ type: 'handoff' });
  assert.deepEqual(types(q.step({ type: 'message', msg: 'VMSTATE_LOADED' })), ['failover']);
  assert.equal(q.exitReason, 'error');
  // On the secondary a protocol error closes the link but never promotes it (invariant 4):
  // the primary may still serve. x-colo-lost-heartbeat does.
  const sec = runningSecondary();
  assert.deepEqual(types(sec.step({ type: 'message', msg: 'VMSTATE_SEND' })), ['closeLink']);
  assert.equal(sec.phase, 'running');
  assert.deepEqual(types(sec.step({ type: 'linkLost', message: 'closed' })), []);
  assert.deepEqual(types(sec.step({ type: 'lostHeartbeat' })), ['failover']);
  assert.equal(sec.exitReason, 'request');
});

test('colo core: a guest crash on the primary leaves COLO (status completed, leave), mid-checkpoint too; nothing after it acts, and a failover under way is not undone', () => {
  const p = replied();
  const out = p.step({ type: 'guestCrashed', message: 'unreachable' });
  assert.deepEqual(types(out), ['status', 'leave']);
  assert.ok(out.some((a) => a.type === 'log' && a.level === 'warn' && /its guest crashed \(unreachable\)/.test(a.message)), JSON.stringify(out));
  assert.equal(p.phase, 'done');
  assert.equal(p.exitReason, 'error');
  for (const ev of [{ type: 'vmPaused' }, { type: 'timer' }, { type: 'message', msg: 'VMSTATE_RECEIVED' }, { type: 'protocolError', message: 'x' }, { type: 'lostHeartbeat' }, { type: 'guestCrashed', message: 'again' }] as const) {
    assert.deepEqual(p.step(ev), [], ev.type);
  }
  const f = new PrimaryCore(() => 300);
  f.step({ type: 'handoff' });
  f.step({ type: 'lostHeartbeat' });
  assert.deepEqual(f.step({ type: 'guestCrashed', message: 'unreachable' }), [], 'the failover finishes as it began');
  assert.deepEqual(types(f.step({ type: 'failoverDone' })), ['status', 'exit']);
});

test('colo core: once the PVM\'s guest exited no checkpoint starts (timer, compare trigger, new delay, one remembered), and the one in flight finishes', () => {
  const p = replied();
  p.step({ type: 'vmPaused' });
  p.step({ type: 'stateCaptured' });
  p.step({ type: 'stateSent' });
  p.step({ type: 'message', msg: 'VMSTATE_RECEIVED' });
  p.step({ type: 'trigger', reason: 'mismatch' }); // remembered for after the checkpoint
  assert.deepEqual(p.step({ type: 'guestExited' }), []);
  p.step({ type: 'vmResumed' });
  assert.deepEqual(types(p.step({ type: 'message', msg: 'VMSTATE_LOADED' })), ['checkpointDone'], 'the checkpoint in flight ends; the remembered trigger starts none');
  assert.equal(p.checkpoints, 1);
  for (const ev of [{ type: 'timer' }, { type: 'trigger', reason: 'timeout' }, { type: 'trigger', reason: 'resync' }, { type: 'delaySet' }] as const) {
    assert.deepEqual(p.step(ev), [], ev.type);
    assert.equal(p.phase, 'running');
  }
  // A failover still runs (the process may live on a while, for the SVM's copy of the last output).
  assert.deepEqual(types(p.step({ type: 'lostHeartbeat' })), ['failover']);
});

test("colo core: the PVM's guest exits before the checkpoint's pause: the checkpoint is abandoned (CHECKPOINT_ABANDONED), the SVM runs on, none starts again", () => {
  const running = (): { p: PrimaryCore; s: SecondaryCore } => {
    const p = runningPrimary();
    const s = runningSecondary();
    assert.deepEqual(types(p.step({ type: 'timer' })), ['send CHECKPOINT_REQUEST']);
    assert.deepEqual(types(s.step({ type: 'message', msg: 'CHECKPOINT_REQUEST' })), ['pauseVm']);
    assert.deepEqual(types(s.step({ type: 'vmPaused' })), ['send CHECKPOINT_REPLY']);
    return { p, s };
  };
  // The exit is seen before CHECKPOINT_REPLY: no pause is asked for.
  const a = running();
  assert.deepEqual(a.p.step({ type: 'guestExited' }), []);
  assert.deepEqual(types(a.p.step({ type: 'message', msg: 'CHECKPOINT_REPLY' })), ['send CHECKPOINT_ABANDONED']);
  assert.equal(a.p.phase, 'running');
  assert.deepEqual(types(a.s.step({ type: 'message', msg: 'CHECKPOINT_ABANDONED' })), ['resumeVm'], 'the SVM runs on to its own end');
  assert.equal(a.s.phase, 'running');
  // The pause was asked for and finds no guest (fed by the exit, and again by the pause).
  const b = running();
  assert.deepEqual(types(b.p.step({ type: 'message', msg: 'CHECKPOINT_REPLY' })), ['pauseVm']);
  assert.deepEqual(types(b.p.step({ type: 'guestExited' })), ['send CHECKPOINT_ABANDONED']);
  assert.deepEqual(b.p.step({ type: 'guestExited' }), [], 'abandoned once');
  assert.deepEqual(b.p.step({ type: 'vmPaused' }), [], 'a late pause result changes nothing');
  for (const ev of [{ type: 'timer' }, { type: 'trigger', reason: 'mismatch' }, { type: 'delaySet' }] as const) assert.deepEqual(b.p.step(ev), [], ev.type);
  assert.equal(b.p.phase, 'running');
  assert.equal(b.p.checkpoints, 0);
  // The secondary takes CHECKPOINT_ABANDONED only for a checkpoint it paused for.
  const s = runningSecondary();
  assert.deepEqual(types(s.step({ type: 'message', msg: 'CHECKPOINT_ABANDONED' })), ['closeLink']);
});

test('colo core: the primary closed at process exit is done at once and silent: nothing it is fed afterwards acts, not even a failover under way', () => {
  const p = new PrimaryCore(() => 300);
  p.step({ type: 'handoff' });
  p.step({ type: 'message', msg: 'CHECKPOINT_READY' });
  assert.deepEqual(p.step({ type: 'close' }), []);
  assert.equal(p.phase, 'done');
  for (const ev of [{ type: 'vmResumed' }, { type: 'timer' }, { type: 'protocolError', message: 'the machine was destroyed' }, { type: 'linkLost', message: 'closed' }, { type: 'graceElapsed' }, { type: 'failoverDone' }] as const) {
    assert.deepEqual(p.step(ev), [], ev.type);
  }
  const f = new PrimaryCore(() => 300);
  f.step({ type: 'handoff' });
  f.step({ type: 'lostHeartbeat' });
  assert.deepEqual(f.step({ type: 'close' }), []);
  assert.deepEqual(f.step({ type: 'failoverDone' }), [], 'no COLO_EXIT at process exit');
  assert.equal(f.exitReason, 'request', 'what was under way stays recorded');
});

test('colo core: a checkpoint cut off by a failover after VMSTATE_RECEIVED is counted on both sides (the secondary applies it, the primary released its output); one cut off before is not', () => {
  /** A primary whose checkpoint (asked for by `reason`) the secondary has whole: VMSTATE_RECEIVED came. */
  const received = (reason: 'periodic' | 'mismatch'): PrimaryCore => {
    const p = runningPrimary();
    p.step(reason === 'periodic' ? { type: 'timer' } : { type: 'trigger', reason });
    p.step({ type: 'message', msg: 'CHECKPOINT_REPLY' });
    p.step({ type: 'vmPaused' });
    p.step({ type: 'stateSent' });
    assert.deepEqual(types(p.step({ type: 'message', msg: 'VMSTATE_RECEIVED' })), ['releaseHeld', 'resumeVm']);
    return p;
  };
  const none = { periodic: 0, mismatch: 0, timeout: 0, resync: 0 };

  // x-colo-lost-heartbeat on the primary while the secondary applies; the secondary, told so
  // too, finishes the apply first (relaunch).
  const p = received('periodic');
  assert.deepEqual(types(p.step({ type: 'lostHeartbeat' })), ['failover']);
  assert.equal(p.checkpoints, 1);
  assert.deepEqual(p.checkpointsBy, { ...none, periodic: 1 });
  assert.deepEqual(types(p.step({ type: 'message', msg: 'VMSTATE_LOADED' })), [], 'the failover is under way');
  assert.equal(p.checkpoints, 1, 'counted once');
  const s = applying();
  s.step({ type: 'lostHeartbeat' });
  s.step({ type: 'applied' });
  assert.equal(s.checkpoints, 1);

  // The link breaks and no heartbeat comes: the failover after the grace period counts it too,
  // as does a protocol error, by the reason it was asked for.
  const g = received('mismatch');
  g.step({ type: 'linkLost', message: 'closed' });
  assert.equal(g.checkpoints, 0, 'not before the failover: VMSTATE_LOADED may still come');
  g.step({ type: 'graceElapsed' });
  assert.deepEqual([g.checkpoints, g.checkpointsBy], [1, { ...none, mismatch: 1 }]);
  const e = received('periodic');
  e.step({ type: 'protocolError', message: 'bad frame' });
  assert.deepEqual([e.checkpoints, e.checkpointsBy], [1, { ...none, periodic: 1 }]);
  // A PVM whose guest crashes then leaves COLO; the secondary applies that checkpoint all the same.
  const c = received('periodic');
  assert.deepEqual(types(c.step({ type: 'guestCrashed', message: 'unreachable' })), ['status', 'leave']);
  assert.deepEqual([c.checkpoints, c.checkpointsBy], [1, { ...none, periodic: 1 }]);

  // Before VMSTATE_RECEIVED the secondary drops the checkpoint and the primary released nothing of it.
  const b = replied();
  b.step({ type: 'vmPaused' });
  b.step({ type: 'stateSent' });
  b.step({ type: 'lostHeartbeat' });
  assert.deepEqual([b.checkpoints, b.checkpointsBy], [0, none]);
});

/** One whole checkpoint on a running secondary, from CHECKPOINT_REQUEST to the apply; the apply's actions. */
function wholeCheckpoint(s: SecondaryCore): SecondaryAction[] {
  s.step({ type: 'message', msg: 'CHECKPOINT_REQUEST' });
  s.step({ type: 'vmPaused' });
  s.step({ type: 'message', msg: 'VMSTATE_SEND' });
  s.step({ type: 'stateReceived' });
  return s.step({ type: 'applied' });
}

test('colo core: an SVM crash asks the primary for a checkpoint at once (not the next periodic one); a streak of them is said once; none mid-pause, none once the link is lost', () => {
  const logs = (as: readonly SecondaryAction[]): string[] => as.flatMap((a) => (a.type === 'log' ? [`${a.level}: ${a.message}`] : []));
  const s = runningSecondary();
  const first = s.step({ type: 'guestCrashed', message: 'unreachable' });
  assert.deepEqual(types(first), ['askCheckpoint'], 'the primary is asked for a checkpoint');
  assert.deepEqual(logs(first).map((l) => l.split(':')[0]), ['warn']);
  assert.equal(s.phase, 'running', 'nothing else changes: the checkpoint comes as any other');
  // The checkpoint that replaces it.
  assert.deepEqual(types(s.step({ type: 'message', msg: 'CHECKPOINT_REQUEST' })), ['pauseVm']);
  s.step({ type: 'vmPaused' });
  s.step({ type: 'message', msg: 'VMSTATE_SEND' });
  s.step({ type: 'stateReceived' });
  // Its state crashes again as soon as it runs (the apply's own run): asked again, at debug.
  const again = s.step({ type: 'guestCrashed', message: 'unreachable' });
  assert.deepEqual(types(again), ['askCheckpoint']);
  assert.deepEqual(logs(again).map((l) => l.split(':')[0]), ['debug'], 'a streak is said once');
  assert.deepEqual(logs(s.step({ type: 'applied' })), [], 'that apply ran a state that crashed: the streak goes on');
  const checkpoint = (): SecondaryAction[] => wholeCheckpoint(s);
  assert.deepEqual(logs(checkpoint()), [], 'it replaced a state that crashed');
  // That one ran until the checkpoint after it: the streak's end is said.
  assert.deepEqual(logs(checkpoint()), ['info: the SVM ran a checkpoint without crashing, after 2 crashes']);
  assert.deepEqual(logs(checkpoint()), [], 'once');
  // A crash while the checkpoint in flight pauses it: that checkpoint replaces it.
  s.step({ type: 'message', msg: 'CHECKPOINT_REQUEST' });
  const midPause = s.step({ type: 'guestCrashed', message: 'unreachable' });
  assert.deepEqual(types(midPause), []);
  assert.deepEqual(logs(midPause).map((l) => l.split(':')[0]), ['warn'], 'a new streak');
  // With the link lost no checkpoint can come: said, nothing asked.
  const lost = receiving();
  lost.step({ type: 'linkLost', message: 'yanked' });
  const late = lost.step({ type: 'guestCrashed', message: 'unreachable' });
  assert.deepEqual(types(late), []);
  assert.match(logs(late)[0]!, /^warn: .*link to the primary is lost.*cannot take over/);
  // After a takeover the crash is the VM's own: COLO says nothing.
  lost.step({ type: 'lostHeartbeat' });
  assert.deepEqual(lost.step({ type: 'guestCrashed', message: 'unreachable' }), []);
});

test('colo core: SVM crashes are replaced by resync checkpoints at once, but no closer together than their gap; any checkpoint asked for since covers a waiting one', () => {
  const p = runningPrimary(60000);
  /** The checkpoint asked for, from CHECKPOINT_REPLY to VMSTATE_LOADED (the PVM resumed before it). */
  const complete = (): PrimaryAction[] => {
    p.step({ type: 'message', msg: 'CHECKPOINT_REPLY' });
    p.step({ type: 'vmPaused' });
    p.step({ type: 'stateSent' });
    p.step({ type: 'message', msg: 'VMSTATE_RECEIVED' });
    p.step({ type: 'vmResumed' });
    return p.step({ type: 'message', msg: 'VMSTATE_LOADED' });
  };
  // The first crash: a checkpoint at once.
  assert.deepEqual(types(p.step({ type: 'svmCrashed', at: 1000, gapMs: 20 })), ['send CHECKPOINT_REQUEST']);
  assert.deepEqual(types(complete()), ['checkpointDone', 'armTimer']);
  // The state crashes the SVM again 6 ms after the last crash's request: the next waits out the gap.
  assert.deepEqual(p.step({ type: 'svmCrashed', at: 1006, gapMs: 20 }), [{ type: 'armCrashTimer', ms: 14 }]);
  assert.deepEqual(p.step({ type: 'svmCrashed', at: 1010, gapMs: 20 }), [], 'one wait at a time');
  assert.equal(p.phase, 'running', 'the PVM runs during the gap');
  assert.deepEqual(types(p.step({ type: 'crashTimer', at: 1020 })), ['send CHECKPOINT_REQUEST']);
  assert.deepEqual(types(complete()), ['checkpointDone', 'armTimer']);
  // A crash that waits, then a periodic checkpoint: that one replaces the SVM, the wait ends with nothing.
  assert.deepEqual(types(p.step({ type: 'svmCrashed', at: 1030, gapMs: 20 })), ['armCrashTimer']);
  assert.deepEqual(types(p.step({ type: 'timer' })), ['send CHECKPOINT_REQUEST']);
  assert.deepEqual(types(p.step({ type: 'crashTimer', at: 1040 })), [], 'the checkpoint in flight covers it');
  assert.deepEqual(types(complete()), ['checkpointDone', 'armTimer']);
  // Past the gap: at once again.
  assert.deepEqual(types(p.step({ type: 'svmCrashed', at: 1500, gapMs: 20 })), ['send CHECKPOINT_REQUEST']);
  assert.deepEqual(types(complete()), ['checkpointDone', 'armTimer']);
  assert.deepEqual(p.checkpointsBy, { periodic: 1, mismatch: 0, timeout: 0, resync: 3 });
  // A wait cut by a failover does nothing.
  assert.deepEqual(types(p.step({ type: 'svmCrashed', at: 1505, gapMs: 20 })), ['armCrashTimer']);
  assert.deepEqual(types(p.step({ type: 'lostHeartbeat' })), ['failover']);
  assert.deepEqual(types(p.step({ type: 'crashTimer', at: 1520 })), []);
});

test("colo core: the SVM's guest exits first (GUEST_EXITED): the primary starts no checkpoint, lets its output through uncompared, waits for its own guest's exit (not the link's grace), and fails over only if it does not come", () => {
  const running = (): { p: PrimaryCore; s: SecondaryCore } => {
    const p = runningPrimary();
    const s = runningSecondary();
    return { p, s };
  };
  // Between checkpoints: the secondary tells, and ends silently.
  const a = running();
  assert.deepEqual(types(a.s.step({ type: 'guestExited' })), ['send GUEST_EXITED']);
  assert.equal(a.s.phase, 'done');
  assert.deepEqual(a.s.step({ type: 'linkLost', message: 'closed' }), [], 'its own exit closes the link: nothing more');
  // Its output goes to the clients uncompared from now on: no copy of it will come.
  assert.deepEqual(types(a.p.step({ type: 'message', msg: 'GUEST_EXITED' })), ['uncompared', 'armExitWait']);
  assert.deepEqual(types(a.p.step({ type: 'linkLost', message: 'the destination closed the connection' })), [], 'the end of its process is no lost secondary: no grace, no failover');
  for (const ev of [{ type: 'timer' }, { type: 'trigger', reason: 'timeout' }, { type: 'trigger', reason: 'resync' }, { type: 'delaySet' }] as const) assert.deepEqual(a.p.step(ev), [], ev.type);
  assert.deepEqual(a.p.step({ type: 'guestExited' }), [], 'its own guest exits too: the process ends');
  assert.deepEqual(a.p.step({ type: 'exitWaitElapsed', ms: 10000 }), [], 'a late wait changes nothing');
  assert.equal(a.p.exitReason, null);
  // The PVM's guest does not exit: the runs diverged; the primary goes on unprotected, saying so.
  const b = running();
  b.p.step({ type: 'message', msg: 'GUEST_EXITED' });
  const out = b.p.step({ type: 'exitWaitElapsed', ms: 10000 });
  assert.deepEqual(types(out), ['failover']);
  assert.ok(out.some((x) => x.type === 'log' && x.level === 'warn' && /secondary's guest exited 10000 ms ago and this one has not: the two runs diverged/.test(x.message)), JSON.stringify(out));
  assert.equal(b.p.exitReason, 'error');
  // The SVM's pause for a checkpoint finds its guest exited: GUEST_EXITED in place of the reply;
  // the PVM is not paused for a node that is gone.
  const c = running();
  assert.deepEqual(types(c.p.step({ type: 'timer' })), ['send CHECKPOINT_REQUEST']);
  assert.deepEqual(types(c.s.step({ type: 'message', msg: 'CHECKPOINT_REQUEST' })), ['pauseVm']);
  assert.deepEqual(types(c.s.step({ type: 'guestExited' })), ['send GUEST_EXITED']);
  assert.deepEqual(c.s.step({ type: 'vmPaused' }), [], 'no reply after it');
  assert.deepEqual(types(c.p.step({ type: 'message', msg: 'GUEST_EXITED' })), ['uncompared', 'armExitWait']);
  assert.equal(c.p.phase, 'running');
  assert.equal(c.p.checkpoints, 0);
  // The guest exits as soon as an apply runs it: VMSTATE_LOADED first, then GUEST_EXITED.
  const d = running();
  d.p.step({ type: 'timer' });
  d.s.step({ type: 'message', msg: 'CHECKPOINT_REQUEST' });
  d.s.step({ type: 'vmPaused' });
  d.s.step({ type: 'message', msg: 'VMSTATE_SEND' });
  d.s.step({ type: 'stateReceived' });
  assert.deepEqual(d.s.step({ type: 'guestExited' }), []);
  assert.deepEqual(types(d.s.step({ type: 'applied' })), ['send VMSTATE_LOADED', 'send GUEST_EXITED']);
  assert.equal(d.s.checkpoints, 1);
  // After a takeover the exit is the VM's own: nothing is sent.
  const e = running();
  e.s.step({ type: 'lostHeartbeat' });
  e.s.step({ type: 'failoverDone' });
  assert.deepEqual(e.s.step({ type: 'guestExited' }), []);
  // The PVM's guest exited first and its process waits for its last output's copy: GUEST_EXITED
  // releases whatever is held (a copy that differed, the runs diverged at the end, never would).
  const g = running();
  assert.deepEqual(g.p.step({ type: 'guestExited' }), []);
  assert.deepEqual(types(g.p.step({ type: 'message', msg: 'GUEST_EXITED' })), ['uncompared']);
  assert.deepEqual(g.p.step({ type: 'exitWaitElapsed', ms: 10000 }), []);
  // GUEST_EXITED in the middle of a checkpoint the secondary replied to cannot be: a protocol error.
  const f = running();
  f.p.step({ type: 'timer' });
  f.p.step({ type: 'message', msg: 'CHECKPOINT_REPLY' });
  assert.deepEqual(types(f.p.step({ type: 'message', msg: 'GUEST_EXITED' })), ['failover']);
});

test('colo core: a primary failover that cannot run the PVM ends COLO with reason error and status failed (abandon), once; a finished failover is not undone by it', () => {
  const p = runningPrimary();
  assert.deepEqual(types(p.step({ type: 'resumeFailed', message: 'x' })), [], 'no failover under way: nothing to fail');
  assert.deepEqual(types(p.step({ type: 'graceElapsed' })), ['failover']);
  const out = p.step({ type: 'resumeFailed', message: 'the vCPU thread died' });
  assert.deepEqual(out.filter((a) => a.type === 'log').map((a) => (a as { level: string }).level), ['error']);
  assert.deepEqual(out.filter((a) => a.type !== 'log'), [{ type: 'status', status: 'failed' }, { type: 'abandon' }]);
  assert.equal(p.phase, 'done');
  assert.equal(p.exitReason, 'error');
  assert.deepEqual(types(p.step({ type: 'failoverDone' })), []);
  assert.deepEqual(types(p.step({ type: 'resumeFailed', message: 'again' })), []);

  const q = runningPrimary();
  q.step({ type: 'lostHeartbeat' });
  assert.deepEqual(types(q.step({ type: 'failoverDone' })), ['status', 'exit']);
  assert.deepEqual(types(q.step({ type: 'resumeFailed', message: 'late' })), []);
  assert.equal(q.exitReason, 'request');
});
