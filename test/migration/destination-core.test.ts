/** DestinationCore scenarios: the main channel's grammar, round counts, switchover, refusals. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { limits } from '../../src/core/limits.js';
import { DestinationCore, type DestinationAction, type DestinationEvent, type FrameSummary, type HelloInfo } from '../../src/migration/destination-core.js';
import { coloWireVersion } from '../../src/migration/stream.js';

type Step = [DestinationEvent, (string | Partial<DestinationAction>)[]];

function play(core: DestinationCore, steps: Step[]): void {
  steps.forEach(([ev, want], i) => {
    const got = core.step(ev);
    assert.deepEqual(got.map((a) => a.type), want.map((w) => (typeof w === 'string' ? w : w.type!)), `step ${i} (${ev.type}${ev.type === 'frame' ? ` ${ev.frame.kind}` : ''}): ${JSON.stringify(got)}`);
    want.forEach((w, j) => {
      if (typeof w !== 'string') assert.deepEqual({ ...got[j], ...w }, got[j], `step ${i} action ${j}: ${JSON.stringify(got[j])}`);
    });
  });
}

const frame = (f: FrameSummary, now = 0): DestinationEvent => ({ type: 'frame', now, frame: f });
const hello = (o: Partial<HelloInfo> = {}): DestinationEvent =>
  frame({ kind: 'hello', hello: { version: 1, migrationId: 'ab'.repeat(16), channels: 2, capabilities: { multifd: true }, ...o } });

function core(caps: Record<string, boolean> = { multifd: true }, handoff = false): DestinationCore {
  return new DestinationCore({ capabilities: caps, version: 1, coloVersion: coloWireVersion, handoff });
}

const opening: Step[] = [
  [{ type: 'listening', now: 0, host: '127.0.0.1', port: 4444 }, [{ type: 'status', status: 'setup' }]],
  [{ type: 'connected', now: 1 }, [{ type: 'status', status: 'active' }]],
  [hello(), []],
  [frame({ kind: 'setup' }), [{ type: 'prepare', channels: 2, migrationId: 'ab'.repeat(16) }]],
  [{ type: 'prepared', now: 5, channelPorts: [1, 2], disk: 'full' }, [{ type: 'reply', message: { kind: 'ready', channelPorts: [1, 2], disk: 'full' } }]],
];

const rounds: Step[] = [
  [frame({ kind: 'pages', count: 10 }), ['apply']],
  [frame({ kind: 'disk', count: 3 }), ['apply']],
  [frame({ kind: 'roundEnd', round: 1, pages: 100, blocks: 3, channels: 0 }), [{ type: 'barrier', round: 1 }]],
  [{ type: 'barrierDone', now: 9, round: 1, multifdPages: 90, bytes: 0 }, []],
  [frame({ kind: 'ramSize', pages: 20 }), ['apply']],
  [frame({ kind: 'roundEnd', round: 2, pages: 5, blocks: 0, channels: 0 }), ['barrier']],
  [{ type: 'barrierDone', now: 10, round: 2, multifdPages: 5, bytes: 0 }, []],
  [frame({ kind: 'deviceState' }), ['apply']],
];

test('happy path: hello, setup, rounds with barriers, device, end, restore, go, run', () => {
  const c = core();
  play(c, [
    ...opening,
    ...rounds,
    [frame({ kind: 'end', rounds: 2, pages: 105, blocks: 3 }), ['restore']],
    [{ type: 'restored', now: 20 }, [{ type: 'reply', message: { kind: 'loaded' } }]],
    [frame({ kind: 'switchover', run: true }), [{ type: 'run', run: true }]],
    [{ type: 'running', now: 30 }, [{ type: 'reply', message: { kind: 'resumed' } }, { type: 'status', status: 'completed' }, 'close']],
    [{ type: 'peerClosed', now: 31 }, []],
    // A late abort frame does not turn a completed migration (a running VM) into a cancelled one.
    [frame({ kind: 'abort', reason: 'late' }), []],
  ]);
  assert.equal(c.phase, 'completed');
  assert.equal(c.stats.dirtySyncCount, 2);
});

test('a channel that breaks after `go` does not stop the VM from starting; before `go` it fails the migration', () => {
  const c = core();
  play(c, [
    ...opening,
    ...rounds,
    [frame({ kind: 'end', rounds: 2, pages: 105, blocks: 3 }), ['restore']],
    [{ type: 'restored', now: 20 }, ['reply']],
    [frame({ kind: 'switchover', run: true }), [{ type: 'run', run: true }]],
    [{ type: 'channelFailure', now: 21, message: 'multifd channel 1: connection reset', code: 'CHANNEL_CLOSED' }, []],
    [{ type: 'peerClosed', now: 22 }, []],
    [{ type: 'running', now: 30 }, ['reply', { type: 'status', status: 'completed' }, 'close']],
  ]);
  const early = core();
  play(early, [
    ...opening,
    ...rounds,
    [frame({ kind: 'end', rounds: 2, pages: 105, blocks: 3 }), ['restore']],
    [{ type: 'restored', now: 20 }, ['reply']],
    [{ type: 'channelFailure', now: 21, message: 'multifd channel 1: connection reset', code: 'CHANNEL_CLOSED' }, [{ type: 'status', status: 'failed' }, { type: 'fail', code: 'CHANNEL_CLOSED' }]],
  ]);
});

test('a round whose pages do not add up fails (a dropped packet or frame)', () => {
  const c = core();
  play(c, [
    ...opening,
    [frame({ kind: 'pages', count: 10 }), ['apply']],
    [frame({ kind: 'roundEnd', round: 1, pages: 100, blocks: 0, channels: 0 }), ['barrier']],
    [{ type: 'barrierDone', now: 9, round: 1, multifdPages: 89, bytes: 0 }, [{ type: 'status', status: 'failed' }, { type: 'fail', code: 'STREAM_INCOMPLETE' }]],
  ]);
  assert.match(c.stats.errorDesc!, /announces 100 pages but 99 arrived/);
});

test('frames out of order are refused before they are applied', () => {
  for (const [name, steps] of [
    ['pages before hello', [[{ type: 'listening', now: 0, host: 'h', port: 1 }, ['status']], [{ type: 'connected', now: 1 }, ['status']], [frame({ kind: 'pages', count: 1 }), ['status', { type: 'fail', code: 'FRAME_ORDER' }]]]],
    ['device state before any round', [...opening, [frame({ kind: 'deviceState' }), ['status', { type: 'fail', code: 'STREAM_INCOMPLETE' }]]]],
    ['a skipped round number', [...opening, [frame({ kind: 'roundEnd', round: 2, pages: 0, blocks: 0, channels: 0 }), ['status', 'fail']]]],
    ['go before the state is loaded', [...opening, ...rounds, [frame({ kind: 'switchover', run: true }), ['status', { type: 'fail', code: 'FRAME_ORDER' }]]]],
    ['pages after the device state', [...opening, ...rounds, [frame({ kind: 'pages', count: 1 }), ['status', { type: 'fail', code: 'FRAME_ORDER' }]]]],
    ['end with other totals', [...opening, ...rounds, [frame({ kind: 'end', rounds: 2, pages: 106, blocks: 3 }), ['status', 'fail']]]],
    ['a disk count that does not match', [...opening, [frame({ kind: 'disk', count: 2 }), ['apply']], [frame({ kind: 'roundEnd', round: 1, pages: 0, blocks: 3, channels: 0 }), ['status', 'fail']]]],
    ['device state inside an unfinished round', [...opening, ...rounds.slice(0, 4), [frame({ kind: 'pages', count: 1 }), ['apply']], [frame({ kind: 'deviceState' }), ['status', { type: 'fail', code: 'STREAM_INCOMPLETE' }]]]],
    ['a round on more multifd channels than were set up', [...opening, [frame({ kind: 'roundEnd', round: 1, pages: 0, blocks: 0, channels: 3 }), ['status', { type: 'fail', code: 'STREAM_INCOMPLETE' }]]]],
  ] as [string, Step[]][]) {
    const c = core();
    try {
      play(c, steps);
    } catch (err) {
      throw new Error(`${name}: ${(err as Error).message}`);
    }
    assert.equal(c.phase, 'failed', name);
  }
});

test('refusals: multifd or x-colo off on the destination, another protocol version, another COLO version', () => {
  const cases: [Record<string, boolean>, DestinationEvent, RegExp][] = [
    [{}, hello(), /multifd is off on the destination/],
    [{ multifd: true }, hello({ channels: 0 }), /multifd is off on the source/],
    [{ multifd: true }, hello({ capabilities: { multifd: true, 'x-colo': true } }), /x-colo is off on the destination/],
    [{ multifd: true }, hello({ version: 7 }), /version 7/],
    // COLO's messages (colo, coloNet frames) have their own version: a pair of two builds that
    // disagree on them is refused before the migration, not misread in the middle of COLO.
    [{ multifd: true, 'x-colo': true }, hello({ capabilities: { multifd: true, 'x-colo': true }, colo: coloWireVersion - 1 }), new RegExp(`COLO protocol version ${coloWireVersion - 1}, this destination ${coloWireVersion}`)],
    [{ multifd: true, 'x-colo': true }, hello({ capabilities: { multifd: true, 'x-colo': true } }), /does not say which COLO protocol version/],
    [{ multifd: true }, hello({ channels: -1 }), /names -1 multifd channels, not a whole number/],
    [{ multifd: true }, hello({ channels: 1.5 }), /names 1\.5 multifd channels/],
  ];
  for (const [caps, h, msg] of cases) {
    const c = core(caps);
    c.step({ type: 'listening', now: 0, host: 'h', port: 1 });
    c.step({ type: 'connected', now: 1 });
    const out = c.step(h);
    assert.deepEqual(out.map((a) => a.type), ['reply', 'status', 'fail']);
    const reply = out[0] as Extract<DestinationAction, { type: 'reply' }>;
    assert.equal(reply.message.kind, 'refuse');
    assert.match((reply.message as { message: string }).message, msg);
  }
});

test('abort from the source cancels; a closed connection fails with CHANNEL_CLOSED', () => {
  const a = core();
  play(a, [...opening, [frame({ kind: 'abort', reason: 'cancelled on the source' }), [{ type: 'status', status: 'cancelled' }, { type: 'fail', status: 'cancelled' }]]]);
  const b = core();
  play(b, [...opening, [{ type: 'peerClosed', now: 9 }, ['status', { type: 'fail', status: 'failed', code: 'CHANNEL_CLOSED' }]]]);
  assert.match(b.stats.errorDesc!, /during the rounds phase/);
});

test('COLO handoff after the state is loaded, only when the source asks for x-colo', () => {
  const c = core({ multifd: true, 'x-colo': true }, true);
  play(c, [
    [{ type: 'listening', now: 0, host: 'h', port: 1 }, ['status']],
    [{ type: 'connected', now: 1 }, ['status']],
    [hello({ capabilities: { multifd: true, 'x-colo': true }, colo: coloWireVersion }), []],
    [frame({ kind: 'setup' }), ['prepare']],
    // `ready` names the COLO version back: the source refuses a destination that names none (an older build).
    [{ type: 'prepared', now: 5, channelPorts: [1, 2], disk: 'none' }, [{ type: 'reply', message: { kind: 'ready', channelPorts: [1, 2], disk: 'none', colo: coloWireVersion } }]],
    ...rounds,
    [frame({ kind: 'end', rounds: 2, pages: 105, blocks: 3 }), ['restore']],
    [{ type: 'restored', now: 20 }, [{ type: 'reply', message: { kind: 'loaded' } }, 'handoff']],
  ]);
  // A secondary on the primary's own image (no snapshot) is refused before any round.
  const shared = core({ multifd: true, 'x-colo': true }, true);
  play(shared, [
    [{ type: 'listening', now: 0, host: 'h', port: 1 }, ['status']],
    [{ type: 'connected', now: 1 }, ['status']],
    [hello({ capabilities: { multifd: true, 'x-colo': true }, colo: coloWireVersion }), []],
    [frame({ kind: 'setup' }), ['prepare']],
    [{ type: 'prepared', now: 5, channelPorts: [1, 2], disk: 'shared' }, [{ type: 'reply', message: { kind: 'refuse', message: 'COLO needs a disk of its own on the secondary (or both nodes with --snapshot): both nodes open the same image file' } }, 'status', { type: 'fail', code: 'MIGRATION_REFUSED' }]],
  ]);
  const plain = core({ multifd: true, 'x-colo': true }, true);
  play(plain, [...opening, ...rounds, [frame({ kind: 'end', rounds: 2, pages: 105, blocks: 3 }), ['restore']], [{ type: 'restored', now: 20 }, ['reply']]]);
  assert.equal(plain.phase, 'loaded');
});

test('a late barrier of an earlier round does not end the round whose SYNCs are still awaited', () => {
  const c = core();
  play(c, [
    ...opening,
    ...rounds.slice(0, 4),
    [frame({ kind: 'roundEnd', round: 2, pages: 5, blocks: 0, channels: 2 }), [{ type: 'barrier', round: 2 }]],
    // Round 1's barrier reported again (a stale completion): round 2's pages may still be on the wire.
    [{ type: 'barrierDone', now: 10, round: 1, multifdPages: 5, bytes: 0 }, []],
    [frame({ kind: 'deviceState' }), ['status', { type: 'fail', code: 'FRAME_ORDER' }]],
  ]);
  assert.equal(c.stats.dirtySyncCount, 1, 'only round 1 is complete');
});

test('a source that asks for more multifd channels than limits.multifdChannelsMax is refused before any is set up', () => {
  const c = core();
  play(c, [
    ...opening.slice(0, 2),
    [hello({ channels: limits.multifdChannelsMax + 1 }), ['reply', 'status', { type: 'fail', code: 'MIGRATION_REFUSED' }]],
  ]);
  assert.match(c.stats.errorDesc!, /more than the \d+ allowed/);
});
