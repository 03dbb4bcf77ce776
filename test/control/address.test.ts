import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { createRequire, syncBuiltinESMExports } from 'node:module';
import { test } from 'node:test';
import { connectTo, formatAddress, listenOn, parseAddress } from '../../src/control/address.js';
import { ChannelClosedError, UsageError } from '../../src/core/errors.js';
import { sleep, tempDir, waitMs, within } from './helpers.js';

test('address: parse unix and tcp forms', () => {
  assert.deepEqual(parseAddress('unix:/tmp/x.qmp'), { kind: 'unix', path: '/tmp/x.qmp' });
  assert.deepEqual(parseAddress('unix:rel/x.qmp'), { kind: 'unix', path: 'rel/x.qmp' });
  assert.deepEqual(parseAddress('unix:/tmp/x.qmp,server,nowait'), { kind: 'unix', path: '/tmp/x.qmp' });
  assert.deepEqual(parseAddress('unix:/tmp/x.qmp,server=on,wait=off'), { kind: 'unix', path: '/tmp/x.qmp' });
  assert.deepEqual(parseAddress('unix:/tmp/a,b'), { kind: 'unix', path: '/tmp/a,b' });
  assert.deepEqual(parseAddress('tcp:127.0.0.1:4444'), { kind: 'tcp', host: '127.0.0.1', port: 4444 });
  assert.deepEqual(parseAddress('tcp:localhost:0'), { kind: 'tcp', host: 'localhost', port: 0 });
  assert.deepEqual(parseAddress('tcp::4444'), { kind: 'tcp', host: '', port: 4444 });
  assert.deepEqual(parseAddress('tcp:[::1]:65535'), { kind: 'tcp', host: '::1', port: 65535 });
  assert.deepEqual(parseAddress('tcp:0.0.0.0:4444,server=on,wait=off'), { kind: 'tcp', host: '0.0.0.0', port: 4444 });
  assert.equal(formatAddress(parseAddress('tcp:[::1]:1')), 'tcp:[::1]:1');
  assert.equal(formatAddress(parseAddress('unix:/a,server')), 'unix:/a');
});

test('address: bad input is one clear UsageError line', () => {
  const cases: [string, string][] = [
    ['/tmp/x.qmp', "bad address '/tmp/x.qmp': expected unix:PATH or tcp:HOST:PORT"],
    ['unix:', "bad address 'unix:': the socket path is empty (expected unix:PATH)"],
    ['tcp:host', "bad address 'tcp:host': expected tcp:HOST:PORT"],
    ['tcp:host:http', "bad address 'tcp:host:http': port 'http' is not a number in 0..65535"],
    ['tcp:host:65536', "bad address 'tcp:host:65536': port '65536' is not a number in 0..65535"],
    ['tcp:host:', "bad address 'tcp:host:': port '' is not a number in 0..65535"],
    ['tcp:::1:4444', "bad address 'tcp:::1:4444': an IPv6 host must be in brackets, as in tcp:[::1]:PORT"],
    ['tcp:[::1:4444', "bad address 'tcp:[::1:4444': missing ']' after the IPv6 address"],
    ['tcp:[nope]:1', "bad address 'tcp:[nope]:1': 'nope' is not an IPv6 address"],
    ['tcp:[::1]4444', "bad address 'tcp:[::1]4444': expected :PORT after the IPv6 address"],
    ['tcp:h:1,reconnect=1', "bad address 'tcp:h:1,reconnect=1': option 'reconnect=1' is not supported"],
    [`unix:/${'a'.repeat(120)}`, `bad address 'unix:/${'a'.repeat(120)}': the socket path is 121 bytes, longer than the 107 a unix socket allows`],
  ];
  for (const [text, message] of cases) {
    assert.throws(
      () => parseAddress(text),
      (err: unknown) => {
        assert.ok(err instanceof UsageError);
        assert.equal(err.message, message);
        assert.ok(!err.message.includes('\n'));
        return true;
      },
    );
  }
});

test('address: unix listen replaces a stale socket, refuses a live one or a plain file, unlinks on close', async (t) => {
  const dir = tempDir(t);
  const sock = path.join(dir, 's.qmp');

  // a stale socket file: its server was SIGKILLed, so nobody unlinked it
  const child = spawnSync(
    process.execPath,
    ['-e', `require('net').createServer().listen(${JSON.stringify(sock)}, () => process.kill(process.pid, 'SIGKILL'))`],
    { timeout: waitMs },
  );
  assert.equal(child.signal, 'SIGKILL');
  assert.ok(fs.lstatSync(sock).isSocket());

  const listener = await listenOn(`unix:${sock}`);
  try {
    listener.server.on('connection', (s) => s.destroy());
    const c = await connectTo(listener.address, waitMs);
    c.destroy();
    await assert.rejects(listenOn(`unix:${sock}`), {
      name: 'UsageError',
      message: `cannot listen on unix:${sock}: another process is listening on it`,
    });
  } finally {
    await within(listener.close(), waitMs, 'listener close');
  }
  assert.equal(fs.existsSync(sock), false, 'socket file removed on close');

  const plain = path.join(dir, 'plain');
  fs.writeFileSync(plain, 'keep me');
  await assert.rejects(listenOn(`unix:${plain}`), {
    name: 'UsageError',
    message: `cannot listen on unix:${plain}: the path exists and is not a socket`,
  });
  assert.equal(fs.readFileSync(plain, 'utf8'), 'keep me');

  // libuv reports a missing directory as EACCES, 'permission denied': the message says what is wrong.
  const missing = path.join(dir, 'gone', 'q.qmp');
  await assert.rejects(listenOn(`unix:${missing}`), {
    name: 'UsageError',
    message: `cannot listen on unix:${missing}: the directory ${path.join(dir, 'gone')} does not exist`,
  });
});

test('address: a unix socket whose listener hangs with a full accept queue is live, not stale: it is not taken over', async (t) => {
  const dir = tempDir(t);
  const sock = path.join(dir, 'hung.qmp');
  // A listener with a queue of one that stops (SIGSTOP) before it accepts anything more.
  const child = spawn(process.execPath, ['-e', `require('net').createServer().listen({ path: ${JSON.stringify(sock)}, backlog: 1 }, () => console.log('up'))`], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.after(() => {
    child.kill('SIGKILL');
  });
  await within(new Promise<void>((resolve) => child.stdout!.once('data', () => resolve())), waitMs, 'the hung listener to listen');
  child.kill('SIGSTOP');
  // Fill its queue: connects that stay pending (a unix connect to a full queue fails with EAGAIN).
  const held: net.Socket[] = [];
  t.after(() => {
    for (const s of held) s.destroy();
  });
  let full = false;
  for (let i = 0; i < 16 && !full; i++) {
    const s = net.connect({ path: sock });
    held.push(s);
    full = await new Promise<boolean>((resolve) => {
      s.once('connect', () => resolve(false));
      s.once('error', (err: NodeJS.ErrnoException) => resolve(err.code === 'EAGAIN'));
    });
  }
  assert.ok(full, 'the hung listener\'s accept queue filled up');
  const err = await listenOn(`unix:${sock}`).then(
    async (l) => {
      await l.close(); // taken over: give it back so that the test ends
      return null;
    },
    (e: unknown) => e,
  );
  assert.ok(err instanceof UsageError, `the socket of a live (hung) process was taken over: ${String(err)}`);
  assert.ok(err.message.startsWith(`cannot listen on unix:${sock}: a process is bound to it and does not accept connections`), err.message);
  assert.ok(fs.lstatSync(sock).isSocket(), 'the live process keeps its socket file');
});

test('address: tcp listen on port 0 reports the bound port; connect refused is ChannelClosedError', async (t) => {
  const listener = await listenOn('tcp:127.0.0.1:0');
  t.after(() => listener.close());
  assert.equal(listener.address.kind, 'tcp');
  const port = listener.address.kind === 'tcp' ? listener.address.port : 0;
  assert.ok(port > 0);
  const sockets: net.Socket[] = [];
  listener.server.on('connection', (s) => sockets.push(s));
  const c = await connectTo(listener.address, waitMs);
  c.destroy();
  for (const s of sockets) s.destroy();
  await listener.close();
  await assert.rejects(connectTo(`tcp:127.0.0.1:${port}`, waitMs), (err: unknown) => {
    assert.ok(err instanceof ChannelClosedError);
    assert.match(err.message, new RegExp(`^cannot connect to tcp:127.0.0.1:${port}: .*ECONNREFUSED`));
    return true;
  });
});

test('address: an aborted connect gives up at once (ChannelClosedError)', async (t) => {
  // A listener that never accepts, its accept queue full (backlog 1, two connections
  // waiting): a further connect stays pending on loopback.
  const child = spawn(process.execPath, ['-e', `const s = require('net').createServer(); s.listen({ port: 0, host: '127.0.0.1', backlog: 1 }, () => console.log(s.address().port));`], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const fillers: net.Socket[] = [];
  t.after(() => {
    for (const s of fillers) s.destroy();
    child.kill('SIGKILL');
  });
  const port = await within(new Promise<number>((resolve) => child.stdout!.once('data', (d: Buffer) => resolve(Number(String(d).trim())))), 10000, 'the listener to print its port');
  child.kill('SIGSTOP');
  for (let i = 0; i < 2; i++) {
    const s = net.connect(port, '127.0.0.1');
    fillers.push(s);
    s.on('error', () => undefined);
    await within(new Promise((resolve) => s.once('connect', resolve)), 5000, `filler connection ${i + 1}`);
  }
  const ac = new AbortController();
  const startedAt = Date.now();
  const pending = connectTo(`tcp:127.0.0.1:${port}`, 10000, 'the slow peer', ac.signal);
  const early = await Promise.race([pending.then(() => 'connected', () => 'failed'), sleep(300).then(() => 'pending')]);
  assert.equal(early, 'pending', 'the connect is still pending (the test needs that)');
  ac.abort();
  await assert.rejects(within(pending, 1000, 'the aborted connect to reject'), (err: unknown) => err instanceof ChannelClosedError && /connecting to the slow peer was given up/.test(err.message));
  assert.ok(Date.now() - startedAt < 2000, 'given up long before the 10 s timeout');
  // An already aborted signal: refused before any socket is made.
  await assert.rejects(connectTo(`tcp:127.0.0.1:${port}`, 10000, undefined, ac.signal), ChannelClosedError);
});

test('address: a unix socket moved away between its bind and the listener looking at it (a proxy put in front) is no failure to listen: the process goes on, and close leaves the moved socket alone', async (t) => {
  const dir = tempDir(t);
  const sock = path.join(dir, 'moved.sock');
  const moved = path.join(dir, 'behind-proxy.sock');
  // The window between the bind and the stat, made certain: the socket is moved away there.
  const cjsFs = createRequire(import.meta.url)('node:fs') as { statSync: typeof fs.statSync };
  const real = cjsFs.statSync;
  let movedAway = false;
  cjsFs.statSync = ((p: fs.PathLike, ...rest: unknown[]) => {
    if (p === sock && !movedAway) {
      movedAway = true;
      fs.renameSync(sock, moved);
    }
    return (real as (...a: unknown[]) => unknown)(p, ...rest);
  }) as typeof fs.statSync;
  syncBuiltinESMExports();
  let l: Awaited<ReturnType<typeof listenOn>>;
  try {
    l = await listenOn({ kind: 'unix', path: sock });
  } finally {
    cjsFs.statSync = real;
    syncBuiltinESMExports();
  }
  assert.ok(movedAway, 'the listener looked at its socket after the bind');
  try {
    // Still listening, reached where the socket was moved to.
    const c = net.connect(moved);
    c.setTimeout(5000, () => c.destroy(new Error('timed out connecting through the moved socket')));
    await new Promise<void>((resolve, reject) => c.once('connect', resolve).once('error', reject));
    c.destroy();
  } finally {
    await l.close();
  }
  assert.ok(fs.existsSync(moved), 'close does not remove a socket that is not at its path any more');
});
