import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Nic } from '../../src/net/nic.js';
import { limits } from '../../src/core/limits.js';

const enc = (s: string) => new TextEncoder().encode(s);
const dec = (b: Uint8Array | string) => (typeof b === 'string' ? b : new TextDecoder().decode(b));

test('input is admitted one event at a time, in sequence order', () => {
  const nic = new Nic();
  nic.enqueue({ seq: 1, kind: 'open', conn: 7 });
  nic.enqueue({ seq: 2, kind: 'data', conn: 7, bytes: enc('ab') });
  nic.enqueue({ seq: 3, kind: 'data', conn: 7, bytes: enc('cd') });
  assert.equal(nic.acceptReady(), false, 'nothing is visible before admission');
  assert.equal(nic.admitOne(), true);
  assert.equal(nic.accept(), 7);
  assert.equal(nic.recv(7, 10, false), 'again');
  nic.admitOne();
  assert.equal(dec(nic.recv(7, 10, false) as Uint8Array), 'ab');
  nic.admitOne();
  assert.equal(dec(nic.recv(7, 1, true) as Uint8Array), 'c', 'peek does not consume');
  assert.equal(dec(nic.recv(7, 10, false) as Uint8Array), 'cd');
  assert.equal(nic.admitOne(), false);
});

test('consumed input comes back as credits: event charges and bytes read, in steps, peeks excluded', () => {
  const nic = new Nic();
  const chunk = new Uint8Array(60 * 1024);
  nic.enqueue({ seq: 1, kind: 'open', conn: 4 });
  let seq = 2;
  const events = 20;
  for (let i = 0; i < events; i++) nic.enqueue({ seq: seq++, kind: 'data', conn: 4, bytes: chunk });
  while (nic.admitOne());
  nic.accept();
  assert.equal(nic.takeCredits(), null, 'admission charges alone stay below one step');
  nic.recv(4, 100, true);
  assert.equal(nic.takeCredits(), null, 'a peek consumes nothing');
  let total = 0;
  let steps = 0;
  for (;;) {
    const r = nic.recv(4, 10000, false);
    if (r === 'again') break;
    for (const c of nic.takeCredits() ?? []) {
      assert.equal(c.conn, 4);
      assert.ok(c.bytes >= limits.nicInputCreditBytes, `a credit of ${c.bytes} bytes is below the step`);
      total += c.bytes;
      steps++;
    }
  }
  const consumed = events * (chunk.byteLength + limits.nicInputEventCharge);
  assert.ok(steps >= 4, `${steps} credits`);
  assert.ok(total <= consumed && consumed - total < limits.nicInputCreditBytes, `credited ${total} of ${consumed}`);
});

test('stale and repeated events are dropped by sequence number', () => {
  const nic = new Nic();
  assert.equal(nic.enqueue({ seq: 5, kind: 'open', conn: 1 }), true);
  assert.equal(nic.enqueue({ seq: 5, kind: 'open', conn: 1 }), false);
  assert.equal(nic.enqueue({ seq: 3, kind: 'close', conn: 1 }), false);
  assert.equal(nic.lastSeq, 5);
});

test('output offsets count bytes per connection; close reports EOF after data', () => {
  const nic = new Nic();
  nic.enqueue({ seq: 1, kind: 'open', conn: 2 });
  nic.enqueue({ seq: 2, kind: 'data', conn: 2, bytes: enc('x') });
  nic.enqueue({ seq: 3, kind: 'close', conn: 2 });
  nic.admitOne(); nic.admitOne(); nic.admitOne();
  nic.accept();
  const a = nic.send(2, enc('hello'));
  const b = nic.send(2, enc('!'));
  assert.deepEqual([a?.kind === 'out' && a.offset, b?.kind === 'out' && b.offset], [0, 5]);
  assert.equal(dec(nic.recv(2, 10, false) as Uint8Array), 'x');
  assert.equal(nic.recv(2, 10, false), 'eof');
  assert.deepEqual(nic.close(2), { kind: 'close', conn: 2, offset: 6 });
});

test('save/restore round-trips and restore validates', () => {
  const nic = new Nic();
  nic.enqueue({ seq: 1, kind: 'open', conn: 3 });
  nic.enqueue({ seq: 2, kind: 'data', conn: 3, bytes: enc('abc') });
  nic.enqueue({ seq: 3, kind: 'data', conn: 3, bytes: enc('def') });
  nic.admitOne(); nic.admitOne();
  const copy = new Nic();
  copy.restore(structuredClone(nic.save()));
  assert.deepEqual(copy.save(), nic.save());
  copy.admitOne();
  assert.equal(copy.accept(), 3);
  assert.equal(dec(copy.recv(3, 10, false) as Uint8Array), 'abcdef');
  assert.throws(() => new Nic().restore({ ...nic.save(), backlog: [99] }), /unknown connection 99/);
  assert.throws(() => new Nic().restore({ ...nic.save(), lastSeq: -1 }), /nic.lastSeq/);
  assert.throws(() => new Nic().restore({ ...nic.save(), pending: [{ seq: 9, kind: 'bogus', conn: 1 }] }), /nic.pending\[0\]/);
});

test('a closed listener: the unaccepted connections close, a later open is refused, accepted ones go on; the state keeps it', () => {
  const nic = new Nic();
  nic.enqueue({ seq: 1, kind: 'open', conn: 1 });
  nic.enqueue({ seq: 2, kind: 'open', conn: 2 });
  nic.enqueue({ seq: 3, kind: 'open', conn: 3 });
  nic.enqueue({ seq: 4, kind: 'data', conn: 3, bytes: enc('x') });
  nic.admitOne();
  nic.admitOne();
  assert.equal(nic.accept(), 1);
  assert.deepEqual(nic.closeListener(), [{ kind: 'close', conn: 2, offset: 0 }], 'the queued connection is closed');
  assert.equal(nic.acceptReady(), false);
  assert.equal(nic.takeRefused(), null);
  nic.admitOne();
  assert.deepEqual(nic.takeRefused(), [{ kind: 'close', conn: 3, offset: 0 }], 'an open admitted after the close is refused');
  assert.equal(nic.admitOne(), true, "the refused connection's data is admitted and dropped");
  assert.equal(nic.isKnown(3), false);
  assert.equal(nic.send(1, enc('ok'))?.kind, 'out', 'the accepted connection goes on');
  const saved = nic.save();
  assert.equal(saved.listening, false);
  const restored = new Nic();
  restored.restore(saved);
  assert.equal(restored.listening, false, 'the closed listener travels in the state');
  const old: Record<string, unknown> = { ...nic.save() };
  delete old.listening;
  const fromOld = new Nic();
  fromOld.restore(old);
  assert.equal(fromOld.listening, true, "an older colo-vm's state (no field) listens");
  assert.throws(() => new Nic().restore({ ...saved, backlog: [1] }), /nic\.backlog: connections wait for accept on a closed listener/);
});
