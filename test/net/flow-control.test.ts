/**
 * Flow control in the service front end (src/net/frontend.ts): a client that floods a guest
 * with input and reads none of the replies is pushed back by TCP instead of filling the host's
 * memory; nothing it sent is lost, and other clients are served meanwhile. (The same under
 * COLO: test/colo/network.test.ts.)
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TestEnv, startKvVm } from '../framework/harness.js';
import { IncrFlood, rssBytes } from '../framework/flood.js';
import { RespClient } from '../framework/resp.js';

const mib = 1024 * 1024;

test('a client that floods commands and reads no replies is pushed back; every command is answered, others are served', async (t) => {
  const env = new TestEnv(t);
  const { vm, port } = await startKvVm(env);
  const pid = vm.child.pid!;
  const other = await RespClient.connect(port);
  env.onCleanup(() => other.close());
  assert.equal(await other.command(['SET', 'other', 'before']), 'OK');
  const rssBefore = rssBytes(pid);

  // Without flow control all 256 MiB go into the VM's memory within a few seconds.
  const flood = await IncrFlood.start(env, port);
  const rssGrowth = rssBytes(pid) - rssBefore;
  t.diagnostic(`flood stalled after ${(flood.written / mib).toFixed(1)} MiB; VM RSS grew ${(rssGrowth / mib).toFixed(1)} MiB`);
  assert.ok(flood.written < flood.target / 2, `the flood was not pushed back: ${(flood.written / mib).toFixed(1)} MiB of ${flood.target / mib} accepted`);
  assert.ok(rssGrowth < 96 * mib, `the VM's memory grew by ${(rssGrowth / mib).toFixed(1)} MiB under the flood`);

  // Another client is served while the flood is held back.
  assert.equal(await other.command(['GET', 'other']), 'before');
  assert.equal(await other.command(['SET', 'other', 'during']), 'OK');

  await flood.readAllReplies();
  assert.equal(await other.command(['GET', 'flood']), String(flood.commands));
  assert.deepEqual(vm.errorLines(), []);
});
