import assert from 'node:assert/strict';
import * as path from 'node:path';
import { test } from 'node:test';
import { formatReply, parseShellCommand, parseShellValue, runQmpCommand } from '../../src/control/qmp-shell.js';
import { QmpCommandError, UsageError } from '../../src/core/errors.js';
import { QmpExactInteger } from '../../src/control/qmp-json.js';
import { formatAddress, listenOn } from '../../src/control/address.js';
import { limits } from '../../src/core/limits.js';
import { startServer, tempDir, within } from './helpers.js';

test('shell: values are JSON when they parse, else strings', () => {
  assert.equal(parseShellValue('42'), 42);
  assert.equal(parseShellValue('-1.5e3'), -1500);
  assert.equal(parseShellValue('true'), true);
  assert.equal(parseShellValue('False'), false);
  assert.equal(parseShellValue('TRUE'), true);
  assert.equal(parseShellValue('null'), null);
  assert.equal(parseShellValue('"123"'), '123');
  assert.equal(parseShellValue('tcp:10.0.0.2:4444'), 'tcp:10.0.0.2:4444');
  assert.equal(parseShellValue('007'), '007');
  assert.equal(parseShellValue('0x10'), '0x10');
  assert.equal(parseShellValue(''), '');
  assert.equal(parseShellValue('1e999'), '1e999');
  assert.deepEqual(parseShellValue('[1,"a",{"b":null}]'), [1, 'a', { b: null }]);
  assert.equal(parseShellValue('{not json'), '{not json');
  assert.throws(() => parseShellValue('12345678901234567890'), UsageError);
  // Nested too: JSON.parse would send 9007199254740992 for it, silently.
  assert.throws(() => parseShellValue('[1, 9007199254740993]'), /the integer 9007199254740993 is too large to be sent exactly/);
  assert.throws(() => parseShellValue('{"a": {"b": -9007199254740993}}'), /the integer -9007199254740993 is too large/);
  assert.deepEqual(parseShellValue('[9007199254740991, 1e300, 9007199254740993.5]'), [9007199254740991, 1e300, 9007199254740993.5]);
});

test('shell: commands, nested keys and JSON arguments', () => {
  assert.deepEqual(parseShellCommand(['query-status']), { execute: 'query-status', arguments: {} });
  assert.deepEqual(parseShellCommand(['migrate', 'uri=tcp:10.0.0.2:4444', 'detach=true']), {
    execute: 'migrate',
    arguments: { uri: 'tcp:10.0.0.2:4444', detach: true },
  });
  assert.deepEqual(parseShellCommand(['migrate-set-capabilities', 'capabilities=[{"capability":"x-colo","state":true}]']), {
    execute: 'migrate-set-capabilities',
    arguments: { capabilities: [{ capability: 'x-colo', state: true }] },
  });
  assert.deepEqual(parseShellCommand(['migrate-set-parameters', 'x-checkpoint-delay=2000']), {
    execute: 'migrate-set-parameters',
    arguments: { 'x-checkpoint-delay': 2000 },
  });
  assert.deepEqual(parseShellCommand(['blockdev-add', 'a.b=1', 'a.c.d=x', 'e=x=y']), {
    execute: 'blockdev-add',
    arguments: { a: { b: 1, c: { d: 'x' } }, e: 'x=y' },
  });
  assert.deepEqual(parseShellCommand(['{"execute":"migrate","arguments":{"uri":"unix:/x"}}']), {
    execute: 'migrate',
    arguments: { uri: 'unix:/x' },
  });
  assert.deepEqual(parseShellCommand(['cmd', '__proto__.x=1']).arguments, JSON.parse('{"__proto__": {"x": 1}}'));
});

test('shell: syntax errors are UsageErrors with qmp-shell wording', () => {
  const cases: [string[], string][] = [
    [[], 'missing QMP command (e.g. query-status)'],
    [['migrate', 'uri'], "Expected a key=value pair, got 'uri'"],
    [['migrate', '=x'], "Expected a key=value pair, got '=x' (empty key)"],
    [['migrate', 'a=1', 'a=2'], 'Cannot set "a" multiple times'],
    [['x', 'a=1', 'a.b=2'], 'Cannot use "a" as both leaf and non-leaf key'],
    [['x', 'a.b=1', 'a=2'], 'Cannot use "a" as both leaf and non-leaf key'],
    [['x', 'a..b=1'], "bad key 'a..b': empty name between dots"],
    [['uri=x'], "expected a QMP command name first, got 'uri=x'"],
    [['{"execute":'], 'the request is not valid JSON: '],
    [['{"arguments":{}}'], 'a JSON request needs an "execute" member with the command name'],
    [['{"execute":"pmemsave","arguments":{"val":18446744073709551615,"size":1,"filename":"/f"}}'], 'the integer 18446744073709551615 is too large to be sent exactly'],
  ];
  for (const [words, message] of cases) {
    assert.throws(
      () => parseShellCommand(words),
      (err: unknown) => {
        assert.ok(err instanceof UsageError, String(err));
        assert.ok(err.message.startsWith(message), `${JSON.stringify(words)}: ${err.message}`);
        return true;
      },
    );
  }
});

test('shell: formatReply is indented JSON', () => {
  assert.equal(formatReply({ status: 'running', running: true }), '{\n  "status": "running",\n  "running": true\n}');
  assert.equal(formatReply({}), '{}');
  assert.equal(formatReply(undefined), '{}');
  const sample = { a: [], b: {}, c: [1, 'x', null, { d: [true, -0.5e-7] }], 'e"f': '\u00e9\n' };
  assert.equal(formatReply(sample), JSON.stringify(sample, null, 2), "JSON.stringify's layout");
  assert.equal(formatReply([new QmpExactInteger('18446744073709551615')]), '[\n  18446744073709551615\n]');
});

class Sink {
  text = '';
  write(s: string): void {
    this.text += s;
  }
}

test('shell: runQmpCommand prints the reply or the error and returns an exit code', async (t) => {
  const { address } = await startServer(t, {}, (s) => {
    s.register({ name: 'query-status', handler: () => ({ status: 'running', running: true }) });
    // QEMU's uint64 and int64 beyond 2^53, as QEMU writes them (a reply of pmemsave's kind, a byte counter).
    s.register({ name: 'query-big', handler: () => ({ addr: new QmpExactInteger('18446744073709551615'), bytes: [new QmpExactInteger('-9007199254740993'), 1] }) });
    s.register({
      name: 'migrate',
      args: { uri: 'str' },
      handler: ({ uri }) => {
        if (uri.startsWith('rdma:')) throw new QmpCommandError('GenericError', 'rdma is not supported');
      },
    });
  });
  const out = new Sink();
  const err = new Sink();
  assert.equal(await runQmpCommand(address, ['query-status'], out, { err, timeoutMs: 3000 }), 0);
  assert.equal(out.text, '{\n  "status": "running",\n  "running": true\n}\n');
  const big = new Sink();
  assert.equal(await runQmpCommand(address, ['query-big'], big, { err, timeoutMs: 3000 }), 0);
  assert.equal(big.text, '{\n  "addr": 18446744073709551615,\n  "bytes": [\n    -9007199254740993,\n    1\n  ]\n}\n', 'printed as the server sent them, not rounded');
  assert.equal(await runQmpCommand(address, ['migrate', 'uri=tcp:h:1'], out, { err }), 0);
  assert.equal(out.text.endsWith('}\n{}\n'), true);
  assert.equal(err.text, '');

  assert.equal(await runQmpCommand(address, ['migrate', 'uri=rdma:h:1'], out, { err }), 1);
  assert.equal(await runQmpCommand(address, ['migrate'], out, { err }), 1);
  assert.equal(await runQmpCommand(address, ['nope'], out, { err }), 1);
  assert.equal(
    err.text,
    'error: GenericError: rdma is not supported\n' +
      "error: GenericError: Parameter 'uri' is missing\n" +
      'error: CommandNotFound: The command nope has not been found\n',
  );

  const single = new Sink();
  assert.equal(await runQmpCommand(address, ['migrate', 'uri'], single), 2);
  assert.equal(single.text, "error: Expected a key=value pair, got 'uri'\n");
  const badAddress = new Sink();
  assert.equal(await runQmpCommand('/tmp/x.qmp', ['query-status'], badAddress), 2);
  assert.equal(badAddress.text, "error: bad address '/tmp/x.qmp': expected unix:PATH or tcp:HOST:PORT\n");
  const nobody = new Sink();
  const missing = path.join(tempDir(t), 'none.qmp');
  assert.equal(await runQmpCommand(`unix:${missing}`, ['query-status'], nobody), 1);
  assert.match(nobody.text, new RegExp(`^error: cannot connect to unix:${missing}: .*ENOENT`));
});

/**
 * `colo qmp` at a port that is not QMP's (the guest's own service): a peer that sends something
 * else than a greeting, even with no newline, fails at once; a silent one after the greeting's
 * own timeout, not after the whole command's (qmpTimeoutMsDefault).
 */
test('shell: runQmpCommand at a port that is not QMP fails at once, or after the greeting timeout, and says so', async (t) => {
  const peer = await listenOn('tcp:127.0.0.1:0');
  const address = formatAddress(peer.address);
  const sockets: import('node:net').Socket[] = [];
  let say: string | null = null;
  peer.server.on('connection', (s) => {
    sockets.push(s);
    s.on('error', () => undefined);
    if (say !== null) s.write(say);
  });
  t.after(async () => {
    for (const s of sockets) s.destroy();
    await peer.close();
  });
  const cases: Array<{ say: string | null; expect: RegExp; withinMs: number }> = [
    // A banner with no newline (a RESP reply, a binary protocol): no waiting for a line.
    { say: '+OK', expect: new RegExp(`^error: ${address} is not a QMP server: it sent "\\+OK" instead of a greeting\n$`), withinMs: 1000 },
    { say: '\x00\x01binary', expect: /is not a QMP server: it sent "\\u0000\\u0001binary" instead of a greeting\n$/, withinMs: 1000 },
    { say: 'SSH-2.0-OpenSSH\r\n', expect: /is not a QMP server: it sent "SSH-2\.0-OpenSSH\\r\\n" instead/, withinMs: 1000 },
    { say: '{"hello": 1}\n', expect: /is not a QMP server: its first line is not a greeting\n$/, withinMs: 1000 },
    { say: '{oops\n', expect: /is not a QMP server: its first line is not JSON: /, withinMs: 1000 },
    // Says nothing at all: only the greeting's timeout tells.
    { say: null, expect: new RegExp(`^error: no QMP greeting from ${address} within ${limits.qmpShellGreetingTimeoutMs} ms \\(is it a QMP socket\\?\\)\n$`), withinMs: limits.qmpShellGreetingTimeoutMs + 1500 },
  ];
  for (const c of cases) {
    say = c.say;
    const out = new Sink();
    const err = new Sink();
    const t0 = performance.now();
    const code = await within(runQmpCommand(address, ['query-status'], out, { err }), limits.qmpTimeoutMsDefault + 5000, `colo qmp at a peer that says ${JSON.stringify(c.say)}`);
    const ms = performance.now() - t0;
    assert.equal(code, 1);
    assert.equal(out.text, '');
    assert.match(err.text, c.expect);
    assert.ok(ms < c.withinMs, `failing took ${ms.toFixed(0)} ms for a peer that says ${JSON.stringify(c.say)} (at most ${c.withinMs})`);
  }
});
