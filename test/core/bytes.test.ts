import { test } from 'node:test';
import assert from 'node:assert/strict';
import { decodeStateJson, encodeStateJson } from '../../src/core/bytes.js';

const text = (b: Uint8Array): string => new TextDecoder().decode(b);

test('state JSON: byte arrays and bigints go through as tagged objects, everything else as JSON', () => {
  const state = {
    a: 1,
    s: 'x',
    big: 12345678901234567890n,
    buf: new Uint8Array([0, 1, 255]),
    view: new Uint8Array([9, 8, 7, 6]).subarray(1, 3),
    nested: [{ b: new Uint8Array(0), n: null }, [1n, 'y']],
    gone: undefined,
    holes: [undefined, 2],
    when: new Date(0),
  };
  const bytes = encodeStateJson(state);
  assert.equal(
    text(bytes),
    '{"a":1,"s":"x","big":{"$big":"12345678901234567890"},"buf":{"$b64":"AAH/"},"view":{"$b64":"CAc="},' +
      '"nested":[{"b":{"$b64":""},"n":null},[{"$big":"1"},"y"]],"holes":[null,2],"when":"1970-01-01T00:00:00.000Z"}',
  );
  assert.deepEqual(decodeStateJson(bytes), {
    a: 1,
    s: 'x',
    big: 12345678901234567890n,
    buf: new Uint8Array([0, 1, 255]),
    view: new Uint8Array([8, 7]),
    nested: [{ b: new Uint8Array(0), n: null }, [1n, 'y']],
    holes: [null, 2],
    when: '1970-01-01T00:00:00.000Z',
  });
});

test('state JSON: only an object with the tag as its one key is converted; "__proto__" stays a key', () => {
  const decoded = decodeStateJson(new TextEncoder().encode('{"__proto__":{"$b64":"AAE="},"t":{"$b64":"AA==","x":1},"u":{"$big":7},"o":{"$big":"-3"}}')) as Record<string, unknown>;
  assert.equal(Object.getPrototypeOf(decoded), Object.prototype);
  assert.deepEqual(Object.keys(decoded), ['__proto__', 't', 'u', 'o']);
  assert.deepEqual(Object.getOwnPropertyDescriptor(decoded, '__proto__')?.value, new Uint8Array([0, 1]));
  assert.deepEqual(decoded.t, { $b64: 'AA==', x: 1 });
  assert.deepEqual(decoded.u, { $big: 7 });
  assert.equal(decoded.o, -3n);
  // And back: the own key "__proto__" is written as a key.
  assert.equal(text(encodeStateJson(decoded)), '{"__proto__":{"$b64":"AAE="},"t":{"$b64":"AA==","x":1},"u":{"$big":7},"o":{"$big":"-3"}}');
});

test('state JSON: bytes that are not UTF-8 or not JSON are refused', () => {
  assert.throws(() => decodeStateJson(new Uint8Array([0x7b, 0xff, 0x7d])));
  assert.throws(() => decodeStateJson(new TextEncoder().encode('{"a":')));
});
