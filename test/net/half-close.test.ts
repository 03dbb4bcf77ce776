/**
 * A client that half-closes (FIN after its requests, then reads: `printf ... | nc -N`) gets every
 * reply: its FIN is the end of its input to the guest, and the guest's output still goes to it
 * until the guest closes (src/net/frontend.ts, allowHalfOpen). Node ended our side at the
 * client's FIN, and the replies written after it were lost. Real process, real sockets.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { TestEnv, withTimeout, startKvVm } from '../framework/harness.js';
import { RespClient } from '../framework/resp.js';

/** Send `request`, half-close, and collect everything until the server closes. */
function halfCloseExchange(port: number, request: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true }, () => {
      s.write(request);
      s.end();
    });
    let got = '';
    s.on('data', (d: Buffer) => (got += d.toString('latin1')));
    s.on('error', reject);
    s.on('close', () => resolve(got));
  });
}

test('a client that sends its requests and half-closes receives every reply, every time', async (t) => {
  const env = new TestEnv(t);
  const { vm, port } = await startKvVm(env);
  for (let i = 0; i < 5; i++) {
    const reply = await withTimeout(halfCloseExchange(port, `SET a hello${i}\r\nGET a\r\nPING\r\n`), 10000, `the replies to half-closed client ${i}`);
    assert.equal(reply, `+OK\r\n$6\r\nhello${i}\r\n+PONG\r\n`, `half-closed client ${i}`);
  }
  const other = await RespClient.connect(port);
  env.onCleanup(() => other.close());
  assert.equal(await other.command(['GET', 'a']), 'hello4');
  assert.deepEqual(vm.errorLines(), []);
});
