/** The QMP JSON dialect, the line splitter and argument schemas. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { JsonMessageBuffer, JsonSyntaxError, LineBuffer, encodeQmpJson, lineTooLong, parseQmpJson } from '../../src/control/qmp-json.js';
import { checkSchema, validateArgs, type QmpArgsOf } from '../../src/control/qmp-schema.js';
import { versionTriple } from '../../src/control/version.js';

test('json: parses standard JSON like JSON.parse', () => {
  const samples = ['{}', '[]', '{"a": [1, -2.5e3, true, false, null, "x\\n\\u00e9\\ud83d\\ude00"]}', ' 0 ', '"\\/\\b\\f\\r\\t"'];
  for (const text of samples) assert.deepEqual(parseQmpJson(text, 10), JSON.parse(text), text);
  // A surrogate pair given as two escapes is one character, in either case of hex digits.
  assert.equal(parseQmpJson('"\\uD83D\\uDE00\\u00e9"', 10), '\u{1F600}\u00e9');
});

test('json: QEMU extensions and refusals', () => {
  assert.deepEqual(parseQmpJson("{'execute': 'migrate', 'arguments': {'uri': 'it\\'s'}}", 10), {
    execute: 'migrate',
    arguments: { uri: "it's" },
  });
  const proto = parseQmpJson('{"__proto__": {"x": 1}}', 10) as Record<string, unknown>;
  assert.equal(Object.getPrototypeOf(proto), Object.prototype);
  assert.deepEqual(Object.keys(proto), ['__proto__']);
  const bad: [string, RegExp][] = [
    ['{"a": 1, "a": 2}', /^duplicate key 'a' at offset/],
    ['[[[1]]]', /^nesting deeper than 2 levels/],
    ['{"a" 1}', /^expecting ':'/],
    ['[1 2]', /^expecting ',' or ']'/],
    ['{"a": 1', /^expecting ',' or '}' but the input ended/],
    ['"abc', /^unterminated string/],
    ['"a\tb"', /^control character in a string/],
    ['"\\x"', /^invalid escape '\\x'/],
    ['01', /^invalid number/],
    ['1.', /^invalid number/],
    ['1e999', /^number 1e999 is out of range/],
    ['nul', /^invalid keyword 'nul'/],
    ['{} {}', /^unexpected text after the value/],
    ['', /^expecting a value but the input ended/],
    ['{1: 2}', /^expecting a string key/],
    // Lone surrogates (QEMU: "... is not a valid Unicode character"); a JS string would carry them
    // on into a file name or URI, where they become U+FFFD.
    ['"\\ud800"', /^\\ud800 is not a valid Unicode character at offset 1/],
    ['"a\\uDE00"', /^\\uDE00 is not a valid Unicode character at offset 2/],
    ['"\\ud83d\\u0041"', /^\\ud83d is not a valid Unicode character/],
    ['"\\ud83dx"', /^\\ud83d is not a valid Unicode character/],
    ['"\\ud83d\\ud83d\\ude00"', /^\\ud83d is not a valid Unicode character at offset 1/],
    ['"\\ud83d\\u12"', /^\\ud83d is not a valid Unicode character/],
  ];
  for (const [text, message] of bad) {
    assert.throws(() => parseQmpJson(text, 2), (err: unknown) => err instanceof JsonSyntaxError && message.test(err.message), text);
  }
});

test('json: encodes in QEMU layout, ASCII only, refusing what JSON cannot carry', () => {
  assert.equal(encodeQmpJson({ return: {}, id: 1 }), '{"return": {}, "id": 1}');
  assert.equal(encodeQmpJson({ a: [1, 'b', null, [], {}], b: undefined, c: 'é😀' }), '{"a": [1, "b", null, [], {}], "c": "\\u00e9\\ud83d\\ude00"}');
  assert.equal(encodeQmpJson([undefined]), '[null]');
  assert.throws(() => encodeQmpJson({ n: 1n }), TypeError);
  assert.throws(() => encodeQmpJson({ n: NaN }), TypeError);
  const cyclic: Record<string, unknown> = {};
  cyclic.self = cyclic;
  assert.throws(() => encodeQmpJson(cyclic), /nested deeper than/);
});

test('lines: split across chunks, limit checked before the newline arrives', () => {
  const lb = new LineBuffer(5);
  lb.push(Buffer.from('ab'));
  assert.equal(lb.shift(), undefined);
  lb.push(Buffer.from('c\nde\n\nfg'));
  assert.equal(String(lb.shift()), 'abc');
  assert.equal(String(lb.shift()), 'de');
  assert.equal(String(lb.shift()), '');
  assert.equal(lb.shift(), undefined);
  assert.equal(lb.bufferedBytes, 2);
  assert.equal(String(lb.takeRest()), 'fg');
  lb.push(Buffer.from('12345\n'));
  assert.equal(String(lb.shift()), '12345');
  lb.push(Buffer.from('123'));
  assert.equal(lb.shift(), undefined);
  lb.push(Buffer.from('456'));
  assert.equal(lb.shift(), lineTooLong);
});

test('messages: a top-level object or array ends at its closing bracket, a newline ends anything, across chunks', () => {
  const mb = new JsonMessageBuffer(64);
  const all = (): string[] => {
    const out: string[] = [];
    for (let m = mb.shift(); m !== undefined; m = mb.shift()) {
      assert.notEqual(m, lineTooLong);
      out.push(String(m));
    }
    return out;
  };
  // No newline: answered as soon as the brace arrives, also split across chunks.
  mb.push(Buffer.from('{"execute":'));
  assert.deepEqual(all(), []);
  mb.push(Buffer.from('"qmp_capabilities"}'));
  assert.deepEqual(all(), ['{"execute":"qmp_capabilities"}']);
  assert.equal(mb.bufferedBytes, 0);
  // Back to back, with nesting; brackets and quotes inside strings (both quotes, escapes) do not count.
  mb.push(Buffer.from(String.raw`{"a":[1,{"b":2}]}[3]{"s":"}]\\"}{'q':'}"\''}`));
  assert.deepEqual(all(), ['{"a":[1,{"b":2}]}', '[3]', String.raw`{"s":"}]\\"}`, String.raw`{'q':'}"\''}`]);
  // Newline-terminated input as before: the line end after an object is an empty message (ignored by the session).
  mb.push(Buffer.from('{"x":1}\r\n'));
  assert.deepEqual(all(), ['{"x":1}', '\r']);
  // Inside an object or array a newline is white space: a pretty-printed command is one message.
  mb.push(Buffer.from('{\n  "execute": "migrate",\n  "arguments": [\n    1\n  ]\n}\n'));
  assert.deepEqual(all(), ['{\n  "execute": "migrate",\n  "arguments": [\n    1\n  ]\n}', '']);
  // Malformed input: a newline inside a string or at the top level ends the message and resets
  // the scan; a stray bracket stays in its line.
  mb.push(Buffer.from('{"y":"\n}}\nnonsense\n'));
  assert.deepEqual(all(), ['{"y":"', '}}', 'nonsense']);
  // An unterminated scalar waits for its newline or the end of input.
  mb.push(Buffer.from('{"z":1} 42'));
  assert.deepEqual(all(), ['{"z":1}']);
  assert.equal(String(mb.takeRest()), ' 42');
  assert.equal(mb.takeRest(), undefined);
  // The limit counts the bytes of one message, reported before its end arrives.
  mb.push(Buffer.from('{"pad":"' + 'x'.repeat(40)));
  assert.equal(mb.shift(), undefined);
  mb.push(Buffer.from('x'.repeat(40)));
  assert.equal(mb.shift(), lineTooLong);
});

test('schema: validation in schema order, depth first, QEMU names', () => {
  const schema = {
    uri: 'str',
    '*blk': 'bool',
    '*caps': [{ struct: { capability: { enum: ['x-colo', 'multifd'] }, state: 'bool' } }],
    '*obj': 'object',
    '*num': 'number',
  } as const;
  checkSchema(schema, 'migrate');
  assert.equal(validateArgs(schema, { uri: 'u' }), undefined);
  assert.equal(validateArgs(schema, { uri: 'u', obj: {}, num: 1.5 }), undefined);
  assert.equal(validateArgs(schema, { z: 1 }), "Parameter 'uri' is missing");
  assert.equal(validateArgs(schema, { uri: 'u', z: 1, caps: 3 }), "Invalid parameter type for 'caps', expected: array");
  assert.equal(validateArgs(schema, { uri: 'u', caps: [{ capability: 'x', state: true }] }), "Parameter 'caps[0].capability' does not accept value 'x'");
  assert.equal(validateArgs(schema, { uri: 'u', caps: [{ capability: 1, state: true }] }), "Invalid parameter type for 'caps[0].capability', expected: string");
  assert.equal(validateArgs(schema, { uri: 'u', caps: [5] }), "Invalid parameter type for 'caps[0]', expected: object");
  assert.equal(validateArgs(schema, { uri: 'u', obj: [] }), "Invalid parameter type for 'obj', expected: object");
  assert.equal(validateArgs(schema, { uri: 'u', num: '1' }), "Invalid parameter type for 'num', expected: number");
  assert.equal(validateArgs(schema, { uri: null }), "Invalid parameter type for 'uri', expected: string");
  // the handler's argument type follows the schema (checked by the compiler)
  type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false;
  type Expected = {
    uri: string;
    blk?: boolean;
    caps?: { capability: 'x-colo' | 'multifd'; state: boolean }[];
    obj?: Record<string, unknown>;
    num?: number;
  };
  const inferred: Equal<QmpArgsOf<typeof schema>, Expected> = true;
  assert.ok(inferred);
});

test('schema: malformed schemas are refused at registration', () => {
  assert.throws(() => checkSchema({ a: 'string' }, 'cmd'), /cmd.a: unknown type 'string'/);
  assert.throws(() => checkSchema({ a: ['str', 'int'] }, 'cmd'), /one element type/);
  assert.throws(() => checkSchema({ a: { enum: [] } }, 'cmd'), /non-empty list of strings/);
  assert.throws(() => checkSchema({ a: 'str', '*a': 'int' }, 'cmd'), /member 'a' defined twice/);
  assert.throws(() => checkSchema({ a: { struct: { b: 'nope' } } }, 'cmd'), /cmd.a.b: unknown type 'nope'/);
  assert.throws(() => checkSchema({ a: { foo: 1 } }, 'cmd'), /a type is a name/);
});

test('version: triple from the package version', () => {
  assert.deepEqual(versionTriple('0.1.0'), { major: 0, minor: 1, micro: 0 });
  assert.deepEqual(versionTriple('8.2.1-rc3'), { major: 8, minor: 2, micro: 1 });
  assert.deepEqual(versionTriple('2'), { major: 2, minor: 0, micro: 0 });
});
