/**
 * Flow control in the service front end (src/net/frontend.ts): a client that floods a guest
 * with input and reads none of the replies is pushed back by TCP instead of filling the host's
 * memory; nothing it sent is lost, and other clients are served meanwhile.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { TestEnv, freePort, guests, waitFor } from '../framework/harness.js';
import { RespClient } from '../framework/resp.js';

const mib = 1024 * 1024;

function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  assert.ok(m !== null, `no VmRSS for process ${pid}`);
  return Number(m[1]) * 1024;
}

test('a client that floods commands and reads no replies is pushed back; every command is answered, others are served', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const vm = await env.startVm({ name: 'kv', guest: guests.kv, args: ['--net', `listen=127.0.0.1:${port}`, '--memory', '64M'] });
  await vm.waitSerial('kv ready');
  const pid = vm.child.pid!;
  const other = await RespClient.connect(port);
  env.onCleanup(() => other.close());
  assert.equal(await other.command(['SET', 'other', 'before']), 'OK');
  const rssBefore = rssBytes(pid);

  // The flood: pipelined INCRs of one key, in chunks of whole commands, as fast as the socket
  // takes them, and no reading. Without flow control all of `target` goes into the VM's memory
  // within a few seconds.
  const cmd = Buffer.from('*2\r\n$4\r\nINCR\r\n$5\r\nflood\r\n');
  const perChunk = Math.floor(65536 / cmd.length);
  const chunk = Buffer.concat(Array<Buffer>(perChunk).fill(cmd));
  const target = 256 * mib;
  const flood = net.connect({ port, host: '127.0.0.1' });
  env.onCleanup(() => {
    flood.destroy();
  });
  flood.pause();
  let written = 0;
  let writing = true;
  const pump = (): void => {
    while (writing && written < target) {
      written += chunk.byteLength;
      if (!flood.write(chunk)) {
        flood.once('drain', pump);
        return;
      }
    }
  };
  await new Promise<void>((resolve, reject) => {
    flood.once('connect', resolve);
    flood.once('error', reject);
  });
  pump();

  // Wait until the writes stall: nothing more accepted for a whole second.
  let last = -1;
  let stillSince = performance.now();
  await waitFor('the flooding client to be pushed back (its writes stall)', () => {
    if (written !== last) {
      last = written;
      stillSince = performance.now();
      return false;
    }
    return performance.now() - stillSince >= 1000;
  }, 30000, 50);
  writing = false;
  const rssGrowth = rssBytes(pid) - rssBefore;
  t.diagnostic(`flood stalled after ${(written / mib).toFixed(1)} MiB; VM RSS grew ${(rssGrowth / mib).toFixed(1)} MiB`);
  assert.ok(written < target / 2, `the flood was not pushed back: ${(written / mib).toFixed(1)} MiB of ${target / mib} accepted`);
  assert.ok(rssGrowth < 96 * mib, `the VM's memory grew by ${(rssGrowth / mib).toFixed(1)} MiB under the flood`);

  // Another client is served while the flood is held back.
  assert.equal(await other.command(['GET', 'other']), 'before');
  assert.equal(await other.command(['SET', 'other', 'during']), 'OK');

  // Every command that was written is answered, in order: the replies are 1, 2, ... n.
  const commands = written / cmd.byteLength;
  let expect = 1;
  let pending: Buffer = Buffer.alloc(0);
  let bad: string | null = null;
  flood.on('data', (d: Buffer) => {
    pending = pending.length === 0 ? d : Buffer.concat([pending, d]);
    let at = 0;
    for (;;) {
      const nl = pending.indexOf(10, at);
      if (nl < 0) break;
      const line = pending.toString('latin1', at, nl - 1);
      if (bad === null && line !== `:${expect}`) bad = `reply ${expect} was '${line}'`;
      expect++;
      at = nl + 1;
    }
    pending = pending.subarray(at);
  });
  flood.resume();
  await waitFor(`all ${commands} flood replies (got ${expect - 1})`, () => bad !== null || expect - 1 >= commands, 120000, 50);
  assert.equal(bad, null);
  assert.equal(expect - 1, commands);
  assert.equal(await other.command(['GET', 'flood']), String(commands));
  assert.deepEqual(vm.errorLines(), []);
});
