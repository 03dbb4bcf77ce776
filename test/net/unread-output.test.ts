/**
 * A client that sends many requests and reads none of the replies cannot make the host queue
 * all of them: past limits.nicClientOutputUnsentBytesMax of unread output its connection is reset
 * (src/net/frontend.ts resetUnread). The input window bounds the requests, not what they
 * produce: 600 GETs of a 512 KiB value took the VM from 117 to 430 MB. Real process, sockets.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { limits } from '../../src/core/limits.js';
import { TestEnv, waitFor, startKvVm } from '../framework/harness.js';
import { rssBytes } from '../framework/flood.js';
import { RespClient } from '../framework/resp.js';

const mib = 1024 * 1024;

test('a client that reads no replies to GETs of a large value is reset past the unread-output bound; the VM stays small, others are served, the client got a correct prefix', async (t) => {
  const env = new TestEnv(t);
  const { vm, port } = await startKvVm(env);
  const pid = vm.child.pid!;
  const other = await RespClient.connect(port);
  env.onCleanup(() => other.close());
  const value = 'v'.repeat(512 * 1024);
  assert.equal(await other.command(['SET', 'v', value]), 'OK');
  assert.equal(await other.command(['SET', 'small', 'before']), 'OK');
  const reply = Buffer.from(`$${value.length}\r\n${value}\r\n`);
  const gets = 2000; // 1000 MiB of replies
  // What the unread output may cost besides itself: output on its way from the vCPU, garbage.
  const bound = limits.nicClientOutputUnsentBytesMax + 128 * mib;
  const rssBefore = rssBytes(pid);

  const received: Buffer[] = [];
  let closed = false;
  const s = net.connect({ port, host: '127.0.0.1' });
  env.onCleanup(() => {
    s.destroy();
  });
  s.pause();
  s.on('data', (d: Buffer) => received.push(d));
  s.on('error', () => undefined);
  s.on('close', () => (closed = true));
  await new Promise<void>((resolve, reject) => {
    s.once('connect', resolve);
    s.once('error', reject);
  });
  s.write('GET v\r\n'.repeat(gets));

  let rssMax = rssBytes(pid);
  await waitFor('the front end to reset the client that reads nothing (or the VM to outgrow the bound)', () => {
    rssMax = Math.max(rssMax, rssBytes(pid));
    return rssMax - rssBefore > bound || /the client left \d+ bytes of output unread/.test(vm.stderr);
  }, 60000, 50);
  const growth = rssMax - rssBefore;
  t.diagnostic(`VM RSS grew by at most ${(growth / mib).toFixed(1)} MiB`);
  assert.ok(growth < bound, `the VM's memory grew by ${(growth / mib).toFixed(1)} MiB for a client that reads nothing`);

  // Others are served.
  assert.equal(await other.command(['GET', 'small']), 'before');
  assert.equal(await other.command(['SET', 'small', 'after']), 'OK');

  // What the client had received is a correct prefix of the replies.
  s.resume();
  await waitFor('the reset client to see its connection end', () => closed, 20000);
  const got = Buffer.concat(received);
  t.diagnostic(`the reset client had ${(got.byteLength / mib).toFixed(1)} MiB of replies`);
  assert.ok(got.byteLength < gets * reply.byteLength, 'the client was reset before all replies');
  for (let at = 0; at < got.byteLength; at += reply.byteLength) {
    const part = got.subarray(at, Math.min(got.byteLength, at + reply.byteLength));
    assert.ok(part.equals(reply.subarray(0, part.byteLength)), `reply ${at / reply.byteLength} is not what kv answers`);
  }
  assert.equal(await other.command(['GET', 'small']), 'after');
  assert.deepEqual(vm.errorLines(), []);
});
