/** QmpSession without sockets: bytes in, lines out. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { QmpDispatcher, QmpSession } from '../../src/control/qmp-protocol.js';
import { deferred, within } from './helpers.js';
import { waitFor } from '../framework/harness.js';

interface Harness {
  session: QmpSession;
  out: string[];
  ended: () => boolean;
  reading: boolean[];
  feed(text: string): void;
  /** Waits until at least n lines were written. */
  lines(n: number): Promise<string[]>;
}

function harness(dispatcher: QmpDispatcher, options: { lineBytesMax?: number; pendingCommandsMax?: number } = {}): Harness {
  const out: string[] = [];
  const reading: boolean[] = [];
  let ended = false;
  let wake: (() => void) | undefined;
  const session = new QmpSession(
    dispatcher,
    {
      write: (line) => {
        out.push(line);
        wake?.();
      },
      end: () => {
        ended = true;
        wake?.();
      },
      setReading: (r) => reading.push(r),
    },
    { clientId: 1, greeting: { QMP: { version: {}, capabilities: ['oob'] } }, ...options },
  );
  return {
    session,
    out,
    ended: () => ended,
    reading,
    feed: (text) => session.receive(Buffer.from(text)),
    lines: (n) =>
      within(
        (async () => {
          while (out.length < n) await new Promise<void>((resolve) => (wake = resolve));
          return out.slice(0, n);
        })(),
        2000,
        `${n} lines (have ${out.length})`,
      ),
  };
}

test('session: greeting, negotiation and a command, byte for byte', async () => {
  const h = harness(new QmpDispatcher());
  h.session.start();
  assert.deepEqual(h.out, ['{"QMP": {"version": {}, "capabilities": ["oob"]}}\r\n']);
  assert.equal(h.session.state, 'negotiating');
  // split across chunks, even inside a multi-byte UTF-8 character
  const bytes = Buffer.from('{"execute": "qmp_capabilities", "id": "é"}\n');
  const cut = bytes.indexOf(0xc3) + 1;
  h.session.receive(bytes.subarray(0, cut));
  h.session.receive(bytes.subarray(cut));
  assert.deepEqual(await h.lines(2), [h.out[0], '{"return": {}, "id": "\\u00e9"}\r\n']);
  assert.equal(h.session.state, 'ready');
  assert.equal(h.session.oobEnabled, false);
  h.feed('{"execute":"query-commands"}\n');
  assert.equal((await h.lines(3))[2], '{"return": [{"name": "qmp_capabilities"}, {"name": "query-commands"}]}\r\n');
});

test('session: parse errors are answered in order with the in-band queue', async () => {
  const d = new QmpDispatcher();
  const gate = deferred();
  d.register({ name: 'wait', handler: () => gate.promise });
  const h = harness(d);
  h.session.start();
  h.feed('{"execute":"qmp_capabilities"}\n{"execute":"wait","id":1}\n{oops}\n');
  await h.lines(2);
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(h.out.length, 2, 'the parse error waits behind the running command');
  gate.resolve();
  const lines = await h.lines(4);
  assert.equal(lines[2], '{"return": {}, "id": 1}\r\n');
  assert.match(lines[3]!, /^\{"error": \{"class": "GenericError", "desc": "JSON parse error, [^"]+"\}\}\r\n$/);
});

test('session: a control byte or 0xFF resets the parser after an unclosed object, as QEMU documents (qmp-spec "Forcing the JSON parser into known-good state")', async () => {
  const h = harness(new QmpDispatcher());
  h.session.start();
  h.feed('{"execute":"qmp_capabilities"}\n');
  await h.lines(2);
  // An unclosed brace: what follows is part of it, as in QEMU, until the client forces a reset.
  h.feed('{"execute": "qmp_capabilities"\n{"execute":"query-commands"}\n');
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(h.out.length, 2, 'the unclosed object swallows the next command');
  h.feed('\x01{"execute":"query-commands","id":1}\n');
  const lines = await h.lines(4);
  assert.match(lines[2]!, /^\{"error": \{"class": "GenericError", "desc": "JSON parse error, [^"]+"\}\}\r\n$/);
  assert.equal(lines[3], '{"return": [{"name": "qmp_capabilities"}, {"name": "query-commands"}], "id": 1}\r\n');
  // 0xFF, the byte QEMU's spec names for older servers, inside an unclosed string too.
  h.session.receive(Buffer.concat([Buffer.from('{"execute": "x'), Buffer.from([0xff]), Buffer.from('{"execute":"query-commands","id":2}\n')]));
  const more = await h.lines(6);
  assert.match(more[4]!, /^\{"error": \{"class": "GenericError", "desc": "JSON parse error, [^"]+"\}\}\r\n$/);
  assert.equal(more[5], '{"return": [{"name": "qmp_capabilities"}, {"name": "query-commands"}], "id": 2}\r\n');
});

test('session: a full in-band queue stops reading until it drains', async () => {
  const d = new QmpDispatcher();
  const gate = deferred();
  let calls = 0;
  d.register({
    name: 'wait',
    handler: async () => {
      calls++;
      await gate.promise;
    },
  });
  const h = harness(d, { pendingCommandsMax: 2 });
  h.session.start();
  h.feed('{"execute":"qmp_capabilities"}\n');
  await h.lines(2);
  h.feed('{"execute":"wait","id":1}\n{"execute":"wait","id":2}\n{"execute":"wait","id":3}\n');
  assert.deepEqual(h.reading, [false], 'paused with 2 pending');
  gate.resolve();
  const lines = await h.lines(5);
  assert.deepEqual(lines.slice(2), ['{"return": {}, "id": 1}\r\n', '{"return": {}, "id": 2}\r\n', '{"return": {}, "id": 3}\r\n']);
  assert.equal(calls, 3);
  assert.deepEqual(h.reading, [false, true]);
});

test('session: end of input flushes an unterminated last line, answers, then ends', async () => {
  const h = harness(new QmpDispatcher());
  h.session.start();
  h.feed('{"execute":"qmp_capabilities"}\n{"execute":"query-commands","id":5}');
  h.session.endOfInput();
  const lines = await h.lines(3);
  assert.match(lines[2]!, /"id": 5\}\r\n$/);
  await waitFor('the session to end its output', h.ended, 2000, 1);
  assert.equal(h.session.state, 'closed');
});

test('session: events only after negotiation, nothing after shutdown', async () => {
  const h = harness(new QmpDispatcher());
  h.session.start();
  assert.equal(h.session.sendEvent('{"event": "X"}\r\n'), false);
  h.feed('{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}\n');
  await h.lines(2);
  assert.equal(h.session.oobEnabled, true);
  assert.equal(h.session.sendEvent('{"event": "X"}\r\n'), true);
  h.session.shutdown();
  assert.equal(h.session.sendEvent('{"event": "Y"}\r\n'), false);
  h.feed('{"execute":"query-commands"}\n');
  await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(h.out.slice(2), ['{"event": "X"}\r\n']);
});

test('session: nesting deeper than the limit is a parse error', async () => {
  const h = harness(new QmpDispatcher());
  h.session.start();
  h.feed('{"execute":"qmp_capabilities"}\n');
  await h.lines(2);
  h.feed('{"execute":"query-commands","id":' + '['.repeat(2000) + ']'.repeat(2000) + '}\n');
  const [, , line] = await h.lines(3);
  assert.match(line!, /JSON parse error, nesting deeper than 1024 levels/);
});
