/**
 * `colo up` (real processes) when more goes wrong than one child: the supervisor itself is
 * sent SIGHUP (its terminal or ssh session closed).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TestEnv, waitFor } from '../framework/harness.js';
import { pidAlive, pidsUsing, startProtectedPair, type ProtectedPair } from '../framework/up.js';

function tail(pair: ProtectedPair): string {
  return `colo up printed: ${pair.sup.timeline()}; its stderr ends: ${pair.sup.stderr.slice(-2000)}`;
}

test('colo up: SIGHUP stops the pair like SIGTERM: both children are gone and colo up exits 0', async (t) => {
  const env = new TestEnv(t);
  const pair = await startProtectedPair(env);
  const { sup, primary, secondary } = pair;
  sup.proc.kill('SIGHUP');
  await sup.waitExit(15000);
  assert.equal(sup.exitSignal, null, `colo up ended by its own exit, not by the signal; ${tail(pair)}`);
  assert.equal(sup.exitCode, 0, tail(pair));
  assert.deepEqual(sup.lines.slice(-2), ['pair: stopping (SIGHUP)', 'pair: stopped'], tail(pair));
  await waitFor('both children to be gone', () => !pidAlive(primary) && !pidAlive(secondary), 5000);
  assert.deepEqual(pidsUsing(env.dir), [], 'no process of the pair is left');
});
