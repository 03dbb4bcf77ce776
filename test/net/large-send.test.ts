/**
 * A guest send larger than limits.nicSendBytesMax is a short write (src/machine/wasi-host.ts
 * sockSend), as a socket's send buffer makes it: the guest sends the rest in its next call.
 * It failed with EINVAL, and kv dropped the connection ('Server closed the connection') on a GET
 * of a value near 1 MiB, or on a dozen pipelined GETs of a 100 kB value. Real process, real socket.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { limits } from '../../src/core/limits.js';
import { TestEnv, startKvVm } from '../framework/harness.js';
import { RespClient } from '../framework/resp.js';

/** `bytes` of text that differs along its length (a repeated or shifted piece shows). */
function valueOf(tag: string, bytes: number): string {
  let s = '';
  for (let i = 0; s.length < bytes; i++) s += `${tag}:${i};`;
  return s.slice(0, bytes);
}

test('kv answers a GET of a value over the send limit, and 20 pipelined GETs of 100 kB, whole and in order', async (t) => {
  const env = new TestEnv(t);
  const { vm, port } = await startKvVm(env);
  const client = await RespClient.connect(port);
  env.onCleanup(() => client.close());

  const big = valueOf('big', 2 * limits.nicSendBytesMax + 12345);
  assert.equal(await client.command(['SET', 'big', big], 20000), 'OK');
  const got = await client.command(['GET', 'big'], 20000);
  assert.equal(typeof got, 'string', `GET big answered ${String(got)}`);
  assert.equal((got as string).length, big.length);
  assert.ok(got === big, 'GET big returned other bytes than were SET');

  const mid = valueOf('mid', 100 * 1000);
  assert.equal(await client.command(['SET', 'mid', mid]), 'OK');
  const replies = await Promise.all(Array.from({ length: 20 }, () => client.command(['GET', 'mid'], 20000)));
  assert.equal(replies.filter((r) => r === mid).length, 20, 'every pipelined GET answered with the whole value');
  assert.equal(await client.command(['PING']), 'PONG', 'the connection lives on');
  assert.deepEqual(vm.errorLines(), []);
});
