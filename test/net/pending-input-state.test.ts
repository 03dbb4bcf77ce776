/**
 * Input beyond the vCPU's input ring belongs to a saved state (src/machine/machine.ts
 * withPendingInput). A stopped VM keeps reading its clients, up to each connection's window, and
 * what the ring (limits.nicInputRingBytes) had no room for waited in the main thread: a state
 * saved then left it out, and a VM restored from it never executed those requests (12 clients ×
 * 850 SETs: 8217 of 10200 keys). Real processes and sockets.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { limits } from '../../src/core/limits.js';
import { TestEnv, freePort, guests, waitFor, withTimeout } from '../framework/harness.js';
import { RespClient } from '../framework/resp.js';

/** Bytes sent to local port `port` that no process has read yet (rx_queue of /proc/net/tcp), or null with no such socket. */
function unreadOnPort(port: number): number | null {
  let total: number | null = null;
  for (const file of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text = '';
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 5) continue;
      const local = f[1]!;
      if (parseInt(local.slice(local.lastIndexOf(':') + 1), 16) !== port || f[3] !== '01') continue; // 01: established
      total = (total ?? 0) + parseInt(f[4]!.split(':')[1]!, 16);
    }
  }
  return total;
}

test('a stopped VM that read more client input than its input ring holds saves all of it: restored, it applies every SET sent', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const args = ['--memory', '128M'];
  const src = await env.startVm({ name: 'src', guest: guests.kv, args: ['--net', `listen=127.0.0.1:${port}`, ...args] });
  await src.waitSerial('kv ready');
  await src.qmp.execute('stop');

  // Each client sends less than its input window (the front end reads all of it), all of them
  // together more than the ring holds.
  const clients = 10;
  const setsPerClient = 900;
  const value = 'x'.repeat(1000);
  let total = 0;
  const sockets: net.Socket[] = [];
  env.onCleanup(() => {
    for (const s of sockets) s.destroy();
  });
  const written: Promise<void>[] = [];
  for (let c = 0; c < clients; c++) {
    let b = '';
    for (let k = 0; k < setsPerClient; k++) b += `SET k${c}_${k} ${value}\r\n`;
    assert.ok(b.length + 64 * limits.nicInputEventCharge < limits.nicConnectionInputWindowBytes, 'a client sends less than its window');
    total += b.length;
    const s = net.connect({ port, host: '127.0.0.1' });
    s.on('error', () => undefined);
    s.pause(); // no replies come while the VM is stopped
    sockets.push(s);
    written.push(new Promise((resolve) => s.write(b, () => resolve())));
  }
  assert.ok(total > limits.nicInputRingBytes, `${total} bytes sent: more than the input ring's ${limits.nicInputRingBytes}`);
  await withTimeout(Promise.all(written), 20000, "the stopped VM's front end to take every client's SETs (their writes to flush)");
  // The front end hands each read on as it makes it, before the QMP command below is read.
  await waitFor('the stopped VM to have read every byte its clients sent', () => unreadOnPort(port) === 0, 20000);

  const file = env.file('vm.state');
  await src.qmp.execute('migrate', { uri: `file:${file}` });
  await src.waitMigrationStatus('completed', 30000);

  const port2 = await freePort();
  const dst = await env.startVm({ name: 'dst', guest: guests.kv, args: ['--net', `listen=127.0.0.1:${port2}`, ...args, '--incoming', `file:${file}`] });
  const reader = await RespClient.whenServing(port2, 'the restored VM');
  env.onCleanup(() => reader.close());
  const expected = clients * setsPerClient;
  let keys: unknown = null;
  try {
    await waitFor(`${expected} keys on the restored VM`, async () => (keys = await reader.command(['DBSIZE'])) === expected, 20000, 100);
  } catch {
    assert.fail(`the restored VM has ${String(keys)} of the ${expected} keys whose SETs the stopped VM had read`);
  }
  assert.equal(await reader.command(['GET', `k${clients - 1}_${setsPerClient - 1}`]), value);
  assert.deepEqual(src.errorLines(), []);
  assert.deepEqual(dst.errorLines(), []);
});
