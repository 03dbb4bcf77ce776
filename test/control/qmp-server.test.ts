import assert from 'node:assert/strict';
import { test } from 'node:test';
import { QmpCommandError } from '../../src/core/errors.js';
import { deferred, rawClient, sleep, startServer, waitMs, within } from './helpers.js';
import { waitFor } from '../framework/harness.js';
import { captureLog } from '../framework/log.js';

const negotiationError = {
  error: { class: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" },
};

test('greeting: exact bytes, QEMU shape, CRLF', async (t) => {
  const { socketPath } = await startServer(t);
  const c = await rawClient(t, socketPath);
  const line = await c.rawLine();
  assert.equal(
    line,
    '{"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "colo-vm 0.1.0"}, "capabilities": ["oob"]}}\r\n',
  );
});

test('negotiation: other commands refused before qmp_capabilities, second qmp_capabilities refused', async (t) => {
  const { socketPath } = await startServer(t);
  const c = await rawClient(t, socketPath);
  await c.next();
  assert.deepEqual(await c.call({ execute: 'query-version', id: 1 }), { ...negotiationError, id: 1 });
  assert.deepEqual(await c.call({ execute: 'no-such-command' }), negotiationError);
  // out-of-band is not enabled yet, so exec-oob is an unknown member
  assert.deepEqual(await c.call({ 'exec-oob': 'query-version', id: 'x' }), {
    error: { class: 'GenericError', desc: "QMP input member 'exec-oob' is unexpected" },
    id: 'x',
  });
  assert.deepEqual(await c.call({ execute: 'qmp_capabilities', arguments: { enable: ['bogus'] } }), {
    error: { class: 'GenericError', desc: "Parameter 'enable[0]' does not accept value 'bogus'" },
  });
  c.send('{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 7}\n');
  assert.equal(await c.rawLine(), '{"return": {}, "id": 7}\r\n');
  assert.deepEqual(await c.call({ execute: 'qmp_capabilities' }), {
    error: { class: 'CommandNotFound', desc: 'Capabilities negotiation is already complete, command ignored' },
  });
  const version = await c.call({ execute: 'query-version', id: [1, { a: 'b' }] });
  assert.deepEqual(version, {
    return: { qemu: { major: 0, minor: 1, micro: 0 }, package: 'colo-vm 0.1.0' },
    id: [1, { a: 'b' }],
  });
});

test('bad JSON gets a GenericError and the connection stays usable', async (t) => {
  const { socketPath } = await startServer(t);
  const c = await rawClient(t, socketPath);
  await c.negotiate();
  for (const bad of ['{"execute": "query-', 'nonsense', '{"execute": "x",}', '{"a": 1, "a": 2}', '{"execute": "pmemsave", "arguments": {"val": 0, "size": 1, "filename": "/tmp/\\udc80"}}']) {
    c.send(bad + '\n');
    const reply = await c.next();
    assert.deepEqual(Object.keys(reply), ['error'], bad);
    const error = reply.error as { class: string; desc: string };
    assert.equal(error.class, 'GenericError');
    assert.match(error.desc, /^JSON parse error, /);
  }
  c.send('\xff\n');
  assert.match(((await c.next()).error as { desc: string }).desc, /^JSON parse error, /);
  // blank lines are ignored; CRLF input is accepted; QEMU's single-quoted strings too
  c.send('\r\n  \n');
  c.send("{'execute': 'query-version', 'id': 'sq'}\r\n");
  const reply = await c.next();
  assert.equal(reply.id, 'sq');
  assert.ok('return' in reply);
});

test('a command without a newline is answered once its object closes (QEMU json-streamer); two back to back get two replies', async (t) => {
  const { socketPath } = await startServer(t);
  const c = await rawClient(t, socketPath);
  await c.next();
  // QEMU's legacy Python client sends json.dumps(cmd), no newline.
  c.send('{"execute":"qmp_capabilities"}');
  assert.equal(await c.rawLine(), '{"return": {}}\r\n');
  c.send('{"execute":"query-version","id":1}{"execute": "query-commands", "id": "}"}');
  assert.equal((await c.next()).id, 1);
  assert.equal((await c.next()).id, '}');
  // Split mid-object: nothing until the closing brace.
  c.send('{"execute":"query-version",');
  assert.ok(await c.silent(50), 'no reply before the object is complete');
  c.send('"id":2}');
  assert.equal((await c.next()).id, 2);
  // A command spread over lines (pretty-printed JSON) is one command, as in QEMU.
  c.send('{\n  "execute": "query-version",\n  "id": 4\n}\n');
  assert.equal((await c.next()).id, 4);
  // A newline inside a string still ends malformed input with an error, and the connection goes on.
  c.send('{"execute": "query-\n{"execute":"query-version","id":3}\n');
  assert.match(((await c.next()).error as { desc: string }).desc, /^JSON parse error, /);
  assert.equal((await c.next()).id, 3);
});

test('request shape errors use QEMU wording and echo the id', async (t) => {
  const { socketPath } = await startServer(t);
  const c = await rawClient(t, socketPath);
  await c.negotiate();
  const cases: [unknown, string][] = [
    [[1, 2], 'QMP input must be a JSON object'],
    [42, 'QMP input must be a JSON object'],
    [{ id: 3 }, "QMP input lacks member 'execute'"],
    [{ execute: 'query-version', x: 1, id: 3 }, "QMP input member 'x' is unexpected"],
    [{ execute: 5, id: 3 }, "QMP input member 'execute' must be a string"],
    [{ execute: 'query-version', arguments: [], id: 3 }, "QMP input member 'arguments' must be an object"],
    [{ execute: 'query-version', 'exec-oob': 'query-version', id: 3 }, "QMP input member 'exec-oob' clashes with 'execute'"],
  ];
  for (const [request, desc] of cases) {
    const expected: Record<string, unknown> = { error: { class: 'GenericError', desc } };
    if (typeof request === 'object' && request !== null && 'id' in request) expected.id = 3;
    assert.deepEqual(await c.call(request), expected, JSON.stringify(request));
  }
});

test('unknown command is CommandNotFound; query-commands lists built-ins and registered commands', async (t) => {
  const { socketPath } = await startServer(t, {}, (s) => s.register({ name: 'stop', handler: () => undefined }));
  const c = await rawClient(t, socketPath);
  await c.negotiate();
  c.send('{"execute": "foo", "id": 1}\n');
  assert.equal(await c.rawLine(), '{"error": {"class": "CommandNotFound", "desc": "The command foo has not been found"}, "id": 1}\r\n');
  assert.deepEqual(await c.call({ execute: 'query-commands' }), {
    return: [{ name: 'qmp_capabilities' }, { name: 'query-commands' }, { name: 'query-version' }, { name: 'stop' }],
  });
  c.send('{"execute":"stop"}\n');
  assert.equal(await c.rawLine(), '{"return": {}}\r\n');
});

test('argument schema errors use QEMU wording', async (t) => {
  const seen: unknown[] = [];
  const { socketPath } = await startServer(t, {}, (s) =>
    s.register({
      name: 'migrate',
      args: {
        uri: 'str',
        '*detach': 'bool',
        '*n': 'uint',
        '*mode': { enum: ['normal', 'colo'] },
        '*caps': [{ struct: { capability: 'str', state: 'bool' } }],
        '*extra': 'any',
      },
      handler: (args) => {
        seen.push(args);
        return { uri: args.uri };
      },
    }),
  );
  const c = await rawClient(t, socketPath);
  await c.negotiate();
  const cases: [Record<string, unknown>, string][] = [
    [{}, "Parameter 'uri' is missing"],
    [{ detach: true }, "Parameter 'uri' is missing"],
    [{ uri: 5 }, "Invalid parameter type for 'uri', expected: string"],
    [{ uri: 'u', detach: 'yes' }, "Invalid parameter type for 'detach', expected: boolean"],
    [{ uri: 'u', y: 1 }, "Parameter 'y' is unexpected"],
    [{ uri: 'u', n: 1.5 }, "Invalid parameter type for 'n', expected: integer"],
    [{ uri: 'u', n: -1 }, "Parameter 'n' expects a non-negative integer"],
    [{ uri: 'u', mode: 'fast' }, "Parameter 'mode' does not accept value 'fast'"],
    [{ uri: 'u', caps: {} }, "Invalid parameter type for 'caps', expected: array"],
    [{ uri: 'u', caps: [{ capability: 'x', state: true }, { capability: 'y' }] }, "Parameter 'caps[1].state' is missing"],
    [{ uri: 'u', caps: [{ capability: 'x', state: true, z: 0 }] }, "Parameter 'caps[0].z' is unexpected"],
  ];
  for (const [args, desc] of cases) {
    assert.deepEqual(await c.call({ execute: 'migrate', arguments: args, id: 9 }), {
      error: { class: 'GenericError', desc },
      id: 9,
    });
  }
  assert.equal(seen.length, 0, 'no handler call for invalid arguments');
  const ok = { uri: 'tcp:h:1', detach: false, n: 0, mode: 'colo', caps: [{ capability: 'x-colo', state: true }], extra: null };
  assert.deepEqual(await c.call({ execute: 'migrate', arguments: ok }), { return: { uri: 'tcp:h:1' } });
  assert.deepEqual(seen, [ok]);
});

test('handler errors: QmpCommandError keeps its class, others become GenericError, server keeps running', async (t) => {
  const { socketPath } = await startServer(t, {}, (s) => {
    s.register({
      name: 'device-gone',
      handler: () => {
        throw new QmpCommandError('DeviceNotFound', "Device 'net0' not found");
      },
    });
    s.register({
      name: 'broken',
      handler: async () => {
        await sleep(1);
        throw new Error('disk on fire');
      },
    });
    s.register({ name: 'weird', handler: () => Promise.reject('a string') });
    s.register({ name: 'unencodable', handler: () => ({ n: 10n }) });
    s.register({ name: 'nothing', handler: async () => {} });
    s.register({ name: 'value', handler: () => [1, 'two', { three: 3.5 }, null, 'é'] });
  });
  const c = await rawClient(t, socketPath);
  await c.negotiate();
  assert.deepEqual(await c.call({ execute: 'device-gone', id: 1 }), {
    error: { class: 'DeviceNotFound', desc: "Device 'net0' not found" },
    id: 1,
  });
  assert.deepEqual(await c.call({ execute: 'broken', id: 2 }), { error: { class: 'GenericError', desc: 'disk on fire' }, id: 2 });
  assert.deepEqual(await c.call({ execute: 'weird' }), { error: { class: 'GenericError', desc: 'a string' } });
  const unencodable = await c.call({ execute: 'unencodable' });
  assert.match((unencodable.error as { desc: string }).desc, /^cannot encode the reply of unencodable: /);
  c.sendJson({ execute: 'nothing', id: 'n' });
  assert.equal(await c.rawLine(), '{"return": {}, "id": "n"}\r\n');
  c.sendJson({ execute: 'value' });
  assert.equal(await c.rawLine(), '{"return": [1, "two", {"three": 3.5}, null, "\\u00e9"]}\r\n');
});

test('in-band commands run one at a time in order; an oob command overtakes a slow one', async (t) => {
  const release = deferred();
  const order: string[] = [];
  let running = 0;
  let maxRunning = 0;
  const { socketPath } = await startServer(t, {}, (s) => {
    s.register({
      name: 'slow',
      args: { tag: 'str' },
      handler: async ({ tag }) => {
        running++;
        maxRunning = Math.max(maxRunning, running);
        order.push(`start ${tag}`);
        if (tag === 'a') await release.promise;
        order.push(`end ${tag}`);
        running--;
        return { tag };
      },
    });
    s.register({ name: 'yank', allowOob: true, handler: (_args, ctx) => ({ oob: ctx.oob }) });
  });
  const c = await rawClient(t, socketPath);
  await c.negotiate();
  c.sendJson({ execute: 'slow', arguments: { tag: 'a' }, id: 'a' });
  c.sendJson({ execute: 'slow', arguments: { tag: 'b' }, id: 'b' });
  c.sendJson({ 'exec-oob': 'yank', id: 'oob' });
  assert.deepEqual(await c.next(), { return: { oob: true }, id: 'oob' });
  assert.ok(await c.silent(50), 'slow commands still running');
  // exec-oob of a command that does not allow it is refused (also out of band)
  c.sendJson({ 'exec-oob': 'slow', arguments: { tag: 'c' }, id: 'bad' });
  assert.deepEqual(await c.next(), { error: { class: 'GenericError', desc: 'The command slow does not support OOB' }, id: 'bad' });
  release.resolve();
  assert.deepEqual(await c.next(), { return: { tag: 'a' }, id: 'a' });
  assert.deepEqual(await c.next(), { return: { tag: 'b' }, id: 'b' });
  assert.deepEqual(order, ['start a', 'end a', 'start b', 'end b']);
  assert.equal(maxRunning, 1);
  // in-band execution of an oob-capable command is fine
  assert.deepEqual(await c.call({ execute: 'yank' }), { return: { oob: false } });
});

test('events reach every negotiated client with a timestamp, never a negotiating one', async (t) => {
  const { server, socketPath } = await startServer(t);
  const a = await rawClient(t, socketPath);
  const b = await rawClient(t, socketPath);
  const late = await rawClient(t, socketPath);
  await a.negotiate();
  await b.negotiate(false);
  await late.next(); // greeting only
  const before = Date.now();
  assert.equal(server.emit('MIGRATION', { status: 'active' }), 2);
  assert.equal(server.emit('STOP'), 2);
  const after = Date.now();
  for (const c of [a, b]) {
    const e1 = await c.next();
    assert.deepEqual(Object.keys(e1), ['event', 'data', 'timestamp']);
    assert.equal(e1.event, 'MIGRATION');
    assert.deepEqual(e1.data, { status: 'active' });
    const ts = e1.timestamp as { seconds: number; microseconds: number };
    assert.ok(Number.isInteger(ts.seconds) && Number.isInteger(ts.microseconds));
    assert.ok(ts.microseconds >= 0 && ts.microseconds < 1_000_000);
    const ms = ts.seconds * 1000 + ts.microseconds / 1000;
    assert.ok(ms >= before - 1 && ms <= after + 1, `timestamp ${ms} within [${before}, ${after}]`);
    const e2 = await c.next();
    assert.deepEqual(Object.keys(e2), ['event', 'timestamp']); // no "data" when there is none
    assert.equal(e2.event, 'STOP');
  }
  assert.ok(await late.silent(50), 'a client that has not negotiated gets no events');
  assert.equal(server.clientCount, 3);
});

test('event timestamps follow the wall clock when it is stepped (NTP, date, a host suspend), as QEMU\'s g_get_real_time', async (t) => {
  const { server, socketPath } = await startServer(t);
  const c = await rawClient(t, socketPath);
  await c.negotiate();
  const realNow = Date.now;
  t.after(() => {
    Date.now = realNow;
  });
  const stampMs = async (): Promise<number> => {
    assert.equal(server.emit('STOP'), 1);
    const ts = (await c.next()).timestamp as { seconds: number; microseconds: number };
    return ts.seconds * 1000 + ts.microseconds / 1000;
  };
  for (const stepMs of [3_600_000, -86_400_000, 0]) {
    Date.now = () => realNow() + stepMs;
    const before = Date.now();
    const ms = await stampMs();
    const after = Date.now();
    assert.ok(ms >= before - 1 && ms <= after + 1, `clock stepped by ${stepMs} ms: timestamp ${ms} within [${before}, ${after}]`);
  }
});

test('a client that never reads is dropped once its unread output passes the bound, and the log says so; the others get every event', async (t) => {
  const outputBytesMax = 64 * 1024;
  const { server, socketPath } = await startServer(t, { outputBytesMax });
  const stuck = await rawClient(t, socketPath);
  const reader = await rawClient(t, socketPath);
  await stuck.negotiate();
  await reader.negotiate();
  const logged = captureLog(t);
  stuck.socket.pause();
  const data = { pad: 'x'.repeat(1000) };
  const events = 4000; // about 4 MB: far beyond the bound and the socket buffers
  for (let i = 0; i < events; i++) {
    server.emit('TEST', data);
    if (i % 32 === 31) await sleep(1); // the reader reads (its LineClient keeps every line), as a live client does
  }
  await waitFor('the client that does not read to be dropped', () => server.clientCount === 1, waitMs);
  stuck.socket.resume();
  await within(stuck.closed, waitMs, 'the dropped client to see its connection end');
  assert.ok(stuck.raw.length < events * 1000, `the dropped client got ${stuck.raw.length} bytes, not all events`);
  for (let i = 0; i < events; i++) assert.equal((await reader.next()).event, 'TEST', `event ${i} of the reader`);
  const warning = logged.filter((l) => / warn qmp: QMP client 1 disconnected: it left more than 65536 bytes of replies and events unread/.test(l));
  assert.equal(warning.length, 1, `one warning names the dropped client; logged: ${JSON.stringify(logged)}`);
});

test('a line longer than the limit is an error and the client is closed; others carry on', async (t) => {
  const { socketPath } = await startServer(t, { lineBytesMax: 1000 });
  const victim = await rawClient(t, socketPath);
  const other = await rawClient(t, socketPath);
  await victim.negotiate();
  await other.negotiate();
  const pad = 1000 - JSON.stringify({ execute: 'query-version', id: '' }).length;
  const exact = JSON.stringify({ execute: 'query-version', id: 'x'.repeat(pad) });
  assert.equal(exact.length, 1000);
  victim.send(exact + '\n');
  assert.equal((await victim.next()).id, 'x'.repeat(pad), 'a line of exactly the limit is fine');
  victim.send('{"execute": "query-version", "id": "' + 'y'.repeat(2000));
  assert.deepEqual(await victim.next(), {
    error: { class: 'GenericError', desc: 'QMP input line is longer than 1000 bytes' },
  });
  await within(victim.closed, waitMs, 'victim closed');
  assert.ok('return' in (await other.call({ execute: 'query-version' })));
});

test('client limit: one client too many gets an error and is closed', async (t) => {
  const { server, socketPath } = await startServer(t, { clientsMax: 2 });
  const a = await rawClient(t, socketPath);
  const b = await rawClient(t, socketPath);
  await a.next();
  await b.next();
  const c = await rawClient(t, socketPath);
  assert.deepEqual(await c.next(), { error: { class: 'GenericError', desc: 'too many QMP clients (at most 2)' } });
  await within(c.closed, waitMs, 'refused client closed');
  assert.equal(server.clientCount, 2);
  await a.close();
  await waitFor("the server to count the first client's close", () => server.clientCount === 1, waitMs, 5);
  const d = await rawClient(t, socketPath);
  assert.ok('QMP' in (await d.next()));
});

test('commands sent before the client half-closes are still answered', async (t) => {
  const { socketPath } = await startServer(t, {}, (s) =>
    s.register({
      name: 'slow',
      handler: async () => {
        await sleep(30);
        return { done: true };
      },
    }),
  );
  const c = await rawClient(t, socketPath);
  // the way `echo ... | socat - UNIX-CONNECT:...` talks: everything at once, then EOF; last line unterminated
  c.socket.end('{"execute":"qmp_capabilities"}\n{"execute":"slow","id":1}\n{"execute":"query-version","id":2}');
  await within(c.closed, waitMs, 'server ends the connection after answering');
  const lines = c.raw.split('\r\n');
  assert.equal(lines.length, 5);
  assert.ok(lines[0]!.startsWith('{"QMP": '));
  assert.equal(lines[1], '{"return": {}}');
  assert.equal(lines[2], '{"return": {"done": true}, "id": 1}');
  assert.ok(lines[3]!.startsWith('{"return": {"qemu": '));
  assert.equal(lines[4], '');
});

test('close() ends every client and the listener; the socket file is removed', async (t) => {
  const { server, socketPath } = await startServer(t);
  const fs = await import('node:fs');
  const a = await rawClient(t, socketPath);
  await a.negotiate();
  assert.ok(fs.existsSync(socketPath));
  await within(server.close(), waitMs, 'close');
  await within(a.closed, waitMs, 'client sees close');
  assert.equal(fs.existsSync(socketPath), false);
  assert.equal(server.emit('SHUTDOWN'), 0);
});

test('an integer id beyond 2^53 is echoed byte for byte, as QEMU does (a double would come back as another number)', async (t) => {
  const { socketPath } = await startServer(t, {}, (s) => s.register({ name: 'echo-n', args: { n: 'int' }, handler: ({ n }) => ({ n }) }));
  const c = await rawClient(t, socketPath);
  await c.negotiate();
  c.send('{"execute": "query-version", "id": 9007199254740993}\n');
  assert.match(await c.rawLine(), /, "id": 9007199254740993\}\r\n$/);
  c.send('{"execute": "no-such", "id": [18446744073709551615, -9223372036854775808, 1.5]}\n');
  assert.equal(
    await c.rawLine(),
    '{"error": {"class": "CommandNotFound", "desc": "The command no-such has not been found"}, "id": [18446744073709551615, -9223372036854775808, 1.5]}\r\n',
  );
  // In arguments such an integer is a number for the handler.
  c.send('{"execute": "echo-n", "arguments": {"n": 9007199254740993}, "id": 1}\n');
  assert.equal(await c.rawLine(), '{"return": {"n": 9007199254740992}, "id": 1}\r\n');
  // Not an object, however large.
  c.send('{"execute": "echo-n", "arguments": 99999999999999999999, "id": 2}\n');
  assert.equal(await c.rawLine(), '{"error": {"class": "GenericError", "desc": "QMP input member \'arguments\' must be an object"}, "id": 2}\r\n');
  c.send('99999999999999999999\n');
  assert.equal(await c.rawLine(), '{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}\r\n');
});

test('int and uint arguments take QEMU\'s int64 and uint64 ranges, beyond 2^53 too (libvirt\'s unlimited max-bandwidth)', async (t) => {
  const seen: unknown[] = [];
  const { socketPath } = await startServer(t, {}, (s) =>
    s.register({
      name: 'set',
      args: { '*i': 'int', '*u': 'uint' },
      handler: (args) => {
        seen.push(args);
      },
    }),
  );
  const c = await rawClient(t, socketPath);
  await c.negotiate();
  for (const args of ['{"u": 9223372036853727232}', '{"u": 18446744073709551615}', '{"i": 9223372036854775807}', '{"i": -9223372036854775808}']) {
    c.send(`{"execute": "set", "arguments": ${args}}\n`);
    assert.equal(await c.rawLine(), '{"return": {}}\r\n', args);
  }
  assert.deepEqual(seen, [{ u: 9223372036853727232 }, { u: 2 ** 64 }, { i: 2 ** 63 }, { i: -(2 ** 63) }]);
  const refused: [string, string][] = [
    ['{"i": 1e30}', "Invalid parameter type for 'i', expected: integer"],
    ['{"u": 1e30}', "Invalid parameter type for 'u', expected: integer"],
    ['{"i": 1.5}', "Invalid parameter type for 'i', expected: integer"],
  ];
  for (const [args, desc] of refused) {
    c.send(`{"execute": "set", "arguments": ${args}}\n`);
    assert.deepEqual(JSON.parse(await c.rawLine()), { error: { class: 'GenericError', desc } }, args);
  }
  assert.equal(seen.length, 4);
});
