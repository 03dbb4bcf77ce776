import assert from 'node:assert/strict';
import * as path from 'node:path';
import type { TestContext } from 'node:test';
import { test } from 'node:test';
import { listenOn } from '../../src/control/address.js';
import { QmpClient } from '../../src/control/qmp-client.js';
import { QmpServer } from '../../src/control/qmp-server.js';
import { ChannelClosedError, QmpCommandError, TimeoutError } from '../../src/core/errors.js';
import { deferred, startServer, tempDir, waitMs, within } from './helpers.js';

async function client(t: TestContext, address: string): Promise<QmpClient> {
  const c = await QmpClient.connect(address, { timeoutMs: waitMs });
  t.after(() => c.close());
  return c;
}

test('client: connect negotiates oob, execute returns values and rejects with QmpCommandError', async (t) => {
  const lines: string[] = [];
  const { address } = await startServer(t, { trace: (_id, dir, line) => lines.push(`${dir} ${line}`) }, (s) => {
    s.register({ name: 'add', args: { a: 'int', b: 'int' }, handler: ({ a, b }) => a + b });
    s.register({ name: 'echo', args: { '*s': 'str' }, handler: ({ s }) => s });
    s.register({
      name: 'fail',
      handler: () => {
        throw new QmpCommandError('DeviceNotActive', 'not active');
      },
    });
  });
  const c = await client(t, address);
  assert.equal(c.oobEnabled, true);
  assert.deepEqual(c.greeting.version.qemu, { major: 0, minor: 1, micro: 0 });
  assert.equal(c.greeting.version.package, 'colo-vm 0.1.0');
  assert.equal(await c.execute('add', { a: 2, b: 3 }), 5);
  assert.deepEqual(await c.execute('query-version'), { qemu: { major: 0, minor: 1, micro: 0 }, package: 'colo-vm 0.1.0' });
  await assert.rejects(c.execute('fail'), (err: unknown) => {
    assert.ok(err instanceof QmpCommandError);
    assert.equal(err.errorClass, 'DeviceNotActive');
    assert.equal(err.message, 'not active');
    return true;
  });
  await assert.rejects(c.execute('add', { a: 'x', b: 1 }), {
    errorClass: 'GenericError',
    message: "Invalid parameter type for 'a', expected: integer",
  });
  await assert.rejects(c.execute('nope'), { errorClass: 'CommandNotFound', message: 'The command nope has not been found' });
  // A lone surrogate cannot be sent (the server would answer a parse error without an id, and
  // the command would time out): refused at once. A pair is one character and goes through.
  await assert.rejects(within(c.execute('echo', { s: 'a\ud800' }), 1000, 'a lone surrogate to be refused'), (err: unknown) => err instanceof TypeError && /cannot encode the arguments of echo: the string "a\\ud800" has a lone surrogate/.test(err.message));
  await assert.rejects(within(c.execute('echo', { ['\udc00']: 1 }), 1000, 'a lone surrogate key to be refused'), TypeError);
  assert.equal(await c.execute('echo', { s: 'a\ud83d\ude00\u00e9' }), 'a\u{1F600}\u00e9');
  // exactly what went over the wire
  assert.deepEqual(lines.slice(0, 4), [
    'out {"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "colo-vm 0.1.0"}, "capabilities": ["oob"]}}',
    'in {"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":1}',
    'out {"return": {}, "id": 1}',
    'in {"execute":"add","arguments":{"a":2,"b":3},"id":2}',
  ]);
});

test('client: oob execution overtakes a slow in-band command', async (t) => {
  const gate = deferred();
  const { address } = await startServer(t, {}, (s) => {
    s.register({ name: 'slow', handler: () => gate.promise.then(() => 'slow done') });
    s.register({ name: 'x-colo-lost-heartbeat', allowOob: true, handler: () => 'failover' });
  });
  const c = await client(t, address);
  const order: string[] = [];
  const slow = c.execute('slow').then((v) => order.push(String(v)));
  const fast = c.execute('x-colo-lost-heartbeat', undefined, { oob: true }).then((v) => order.push(String(v)));
  await fast;
  assert.deepEqual(order, ['failover']);
  gate.resolve();
  await slow;
  assert.deepEqual(order, ['failover', 'slow done']);
});

test('client: waitEvent finds past and future events, counts, "after now", filters', async (t) => {
  const { server, address } = await startServer(t);
  const c = await client(t, address);
  const seen: string[] = [];
  const off = c.on('event', (e) => seen.push(`${e.index}:${e.event}`));
  server.emit('RESUME');
  server.emit('MIGRATION', { status: 'active' });
  server.emit('STOP');
  server.emit('RESUME');
  // past: already arrived
  const first = await c.waitEvent('RESUME', {}, waitMs);
  assert.equal(first.index, 0);
  assert.deepEqual(first.data, {});
  const second = await c.waitEvent('RESUME', { nth: 2, timeoutMs: waitMs });
  assert.equal(second.index, 3);
  assert.equal(c.eventCount, 4);
  // future: the 3rd RESUME, and the next STOP after now
  const mark = c.eventCount;
  const third = c.waitEvent('RESUME', { nth: 3, timeoutMs: waitMs });
  const nextStop = c.waitEvent('STOP', { after: mark, timeoutMs: waitMs });
  const completed = c.waitEvent('MIGRATION', (e) => e.data.status === 'completed', waitMs);
  server.emit('MIGRATION', { status: 'completed' });
  server.emit('STOP');
  server.emit('RESUME');
  assert.equal((await third).index, 6);
  assert.equal((await nextStop).index, 5);
  const done = await completed;
  assert.equal(done.index, 4);
  assert.deepEqual(done.data, { status: 'completed' });
  assert.ok(done.timestamp.seconds > 1_600_000_000);
  assert.deepEqual(
    c.events.map((e) => e.event),
    ['RESUME', 'MIGRATION', 'STOP', 'RESUME', 'MIGRATION', 'STOP', 'RESUME'],
  );
  off();
  server.emit('SHUTDOWN');
  await c.waitEvent('SHUTDOWN', { after: mark, timeoutMs: waitMs });
  assert.equal(seen.length, 7, 'no callback after unsubscribing');
});

test('client: eventLogMax bounds the log (0: none kept); waits for events after now and the count still work', async (t) => {
  const { server, address } = await startServer(t);
  const kept = await QmpClient.connect(address, { timeoutMs: waitMs, eventLogMax: 10 });
  t.after(() => kept.close());
  const none = await QmpClient.connect(address, { timeoutMs: waitMs, eventLogMax: 0 });
  t.after(() => none.close());
  const mark = none.eventCount;
  const waited = none.waitEvent('SHUTDOWN', { after: mark, timeoutMs: waitMs });
  for (let i = 0; i < 500; i++) server.emit(i % 2 === 0 ? 'STOP' : 'RESUME');
  server.emit('SHUTDOWN');
  await kept.waitEvent('SHUTDOWN', { timeoutMs: waitMs });
  assert.equal((await waited).index, 500, 'a wait set up before the event resolves with it');
  assert.equal(none.eventCount, 501);
  assert.equal(none.events.length, 0, 'a client with eventLogMax 0 keeps no events');
  assert.equal(kept.eventCount, 501);
  assert.ok(kept.events.length >= 10 && kept.events.length <= 10 + 2, `the log keeps the last 10 (and at most an eighth more): ${kept.events.length}`);
  assert.equal(kept.events.at(-1)!.event, 'SHUTDOWN');
});

test('client: waitEvent and execute time out with a message that says what was awaited', async (t) => {
  const { server, address } = await startServer(t, {}, (s) => s.register({ name: 'hang', handler: () => new Promise(() => {}) }));
  const c = await client(t, address);
  server.emit('RESUME');
  server.emit('RESUME');
  await c.waitEvent('RESUME', { nth: 2, timeoutMs: waitMs });
  await assert.rejects(c.waitEvent('RESUME', { nth: 3, timeoutMs: 50 }), (err: unknown) => {
    assert.ok(err instanceof TimeoutError);
    assert.equal(err.message, `timed out after 50 ms waiting for event RESUME #3 from ${address}; saw 2 matching`);
    return true;
  });
  await assert.rejects(c.waitEvent('STOP', { after: c.eventCount, timeoutMs: 30 }), {
    name: 'TimeoutError',
    message: `timed out after 30 ms waiting for event STOP after event index 2 from ${address}`,
  });
  await assert.rejects(c.execute('hang', undefined, { timeoutMs: 40 }), (err: unknown) => {
    assert.ok(err instanceof TimeoutError);
    assert.match(err.message, new RegExp(`^timed out after 40 ms waiting for reply to hang \\(id \\d+\\) from ${address}$`));
    return true;
  });
});

test('client: server close rejects pending executions and event waits with ChannelClosedError', async (t) => {
  const started = deferred();
  const { server, address } = await startServer(t, {}, (s) =>
    s.register({
      name: 'hang',
      handler: () => {
        started.resolve();
        return new Promise(() => {});
      },
    }),
  );
  const c = await client(t, address);
  let closeReason: ChannelClosedError | undefined;
  c.on('close', (err) => (closeReason = err));
  const pending = assert.rejects(c.execute('hang', undefined, { timeoutMs: waitMs }), (err: unknown) => {
    assert.ok(err instanceof ChannelClosedError);
    assert.match(err.message, /closed while waiting for reply to hang/);
    return true;
  });
  const waiting = assert.rejects(c.waitEvent('SHUTDOWN', { timeoutMs: waitMs }), ChannelClosedError);
  await within(started.promise, waitMs, 'handler started');
  await within(server.close(), waitMs, 'server close');
  await within(pending, waitMs, 'pending rejected');
  await within(waiting, waitMs, 'wait rejected');
  assert.ok(closeReason instanceof ChannelClosedError);
  assert.equal(c.closed, true);
  await assert.rejects(c.execute('query-version'), ChannelClosedError);
  await assert.rejects(c.waitEvent('X', { timeoutMs: waitMs }), ChannelClosedError);
});

test('client: close() rejects its own pending executions', async (t) => {
  const { address } = await startServer(t, {}, (s) => s.register({ name: 'hang', handler: () => new Promise(() => {}) }));
  const c = await client(t, address);
  const pending = assert.rejects(c.execute('hang', undefined, { timeoutMs: waitMs }), {
    name: 'ChannelClosedError',
    message: /closed by the client while waiting for reply to hang/,
  });
  await within(c.close(), waitMs, 'client close');
  await pending;
});

test('client: connect failures — nobody there, a silent server, too many clients', async (t) => {
  const dir = tempDir(t);
  const missing = `unix:${path.join(dir, 'none.qmp')}`;
  await assert.rejects(QmpClient.connect(missing, { timeoutMs: waitMs }), (err: unknown) => {
    assert.ok(err instanceof ChannelClosedError);
    assert.match(err.message, new RegExp(`^cannot connect to ${missing}: `));
    return true;
  });

  const silent = await listenOn(`unix:${path.join(dir, 'silent.qmp')}`);
  const sockets: import('node:net').Socket[] = [];
  silent.server.on('connection', (s) => sockets.push(s));
  t.after(async () => {
    for (const s of sockets) s.destroy();
    await silent.close();
  });
  await assert.rejects(QmpClient.connect(silent.address, { timeoutMs: 60 }), {
    name: 'TimeoutError',
    message: `no QMP greeting from unix:${path.join(dir, 'silent.qmp')} within 60 ms (is it a QMP socket?)`,
  });

  const { address } = await startServer(t, { clientsMax: 1 });
  await client(t, address);
  await assert.rejects(QmpClient.connect(address, { timeoutMs: waitMs }), {
    errorClass: 'GenericError',
    message: 'too many QMP clients (at most 1)',
  });
});

test('client: connect without oob when asked', async (t) => {
  const { address } = await startServer(t, {}, (s) => s.register({ name: 'y', allowOob: true, handler: () => 1 }));
  const c = await QmpClient.connect(address, { timeoutMs: waitMs, oob: false });
  t.after(() => c.close());
  assert.equal(c.oobEnabled, false);
  await assert.rejects(c.execute('y', undefined, { oob: true, timeoutMs: waitMs }), {
    errorClass: 'GenericError',
    message: "QMP input member 'exec-oob' is unexpected",
  });
});

test('client and server over tcp (port 0 → the bound port)', async (t) => {
  const { formatAddress } = await import('../../src/control/address.js');
  const server = new QmpServer({ version: '1.2.3' });
  t.after(() => within(server.close(), waitMs, 'server close'));
  const bound = await server.listen('tcp:127.0.0.1:0');
  assert.equal(bound.kind, 'tcp');
  assert.deepEqual(server.address, bound);
  const c = await client(t, formatAddress(bound));
  assert.deepEqual(await c.execute('query-version'), { qemu: { major: 1, minor: 2, micro: 3 }, package: 'colo-vm 1.2.3' });
  server.emit('RESUME');
  assert.equal((await c.waitEvent('RESUME', {}, waitMs)).index, 0);
});

test('client: connectWhenUp waits for a socket that appears late, and fails with the caller\'s errors', async (t) => {
  const dir = tempDir(t);
  // Never appears: the caller's timeout error, after about timeoutMs.
  const never = path.join(dir, 'never.qmp');
  const t0 = Date.now();
  await assert.rejects(
    QmpClient.connectWhenUp(never, { timeoutMs: 150, gone: () => null, timedOut: () => new TimeoutError('no socket') }),
    (err: unknown) => err instanceof TimeoutError && err.message === 'no socket',
  );
  assert.ok(Date.now() - t0 >= 150, 'it waited for the whole timeout');
  // The process is gone: its error at once.
  await assert.rejects(QmpClient.connectWhenUp(never, { timeoutMs: 5000, gone: () => new Error('exited with code 3'), timedOut: () => new Error('x') }), /exited with code 3/);
  // A server that starts listening after the wait began.
  const late = path.join(dir, 'late.qmp');
  const waiting = QmpClient.connectWhenUp(late, { timeoutMs: waitMs, gone: () => null, timedOut: () => new Error('the late server never answered') });
  await new Promise((r) => setTimeout(r, 100));
  const server = new QmpServer({ version: '0.1.0' });
  await server.listen(`unix:${late}`);
  t.after(() => within(server.close(), waitMs, 'server close'));
  const c = await within(waiting, waitMs, 'connectWhenUp to the late server');
  t.after(() => c.close());
  assert.deepEqual(await c.execute('query-version'), { qemu: { major: 0, minor: 1, micro: 0 }, package: 'colo-vm 0.1.0' });
});
