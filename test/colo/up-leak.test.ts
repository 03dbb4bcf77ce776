/**
 * `colo up` (real processes) over many failovers and re-protections: what the long-lived
 * supervisor keeps. Every child it starts comes with a process handle and two QMP clients
 * (commands and events; the heartbeat), each with an event log that gains a STOP and a RESUME
 * per checkpoint. A supervisor that re-protects for years must keep those of its living
 * children only, not of every secondary it ever started.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { coloBin, freePort, guests, waitFor } from '../framework/harness.js';
import { TestEnv } from '../framework/harness.js';
import { spawnSupervisor } from '../framework/up.js';

/** How many objects of each of `names` (constructor names) a V8 heap snapshot holds. */
function countObjects(snapshotPath: string, names: readonly string[]): Map<string, number> {
  const snap = JSON.parse(fs.readFileSync(snapshotPath, 'utf8')) as {
    snapshot: { meta: { node_fields: string[]; node_types: [string[]] } };
    nodes: number[];
    strings: string[];
  };
  const fields = snap.snapshot.meta.node_fields;
  const typeAt = fields.indexOf('type');
  const nameAt = fields.indexOf('name');
  const objectType = snap.snapshot.meta.node_types[0].indexOf('object');
  const counts = new Map(names.map((n) => [n, 0]));
  for (let i = 0; i < snap.nodes.length; i += fields.length) {
    if (snap.nodes[i + typeAt] !== objectType) continue;
    const name = snap.strings[snap.nodes[i + nameAt]!]!;
    const n = counts.get(name);
    if (n !== undefined) counts.set(name, n + 1);
  }
  return counts;
}

test('colo up: after 4 failovers and re-protections the supervisor holds the process handles and QMP clients of its 2 living children only', async (t) => {
  const env = new TestEnv(t);
  const port = await freePort();
  const image = env.image('kv.img', 8 * 1024 * 1024);
  // A heartbeat timeout well above the time the heap snapshot stops the supervisor for.
  const args = [coloBin, 'up', guests.kv, '--net', `listen=127.0.0.1:${port}`, '--drive', `file=${image}`, '--memory', '64M'];
  args.push('--checkpoint-delay', '50', '--heartbeat-timeout', '10000', '--state-dir', env.dir);
  const sup = spawnSupervisor(env, args, undefined, { NODE_OPTIONS: '--heapsnapshot-signal=SIGUSR2' });
  const protectedRe = /^pair: protected \(primary pid (\d+), secondary pid (\d+)\)$/;
  let at = await sup.line(protectedRe, 0, 90000);
  // Each protection ends before it is stable (30 s): failed attempts, retried after 1, 2, 3 s
  // (a fifth in a row would wait 60 s). Both kinds of failover: the secondary dies, the primary dies.
  for (let cycle = 1; cycle <= 4; cycle++) {
    const victim = Number(at.m[cycle % 2 === 1 ? 2 : 1]);
    process.kill(victim, 'SIGKILL');
    at = await sup.line(protectedRe, at.at + 1, 60000);
  }
  const [primary, secondary] = [Number(at.m[1]), Number(at.m[2])];
  // Its own heap snapshot (NODE_OPTIONS): written to its working folder, the state folder.
  const before = new Set(fs.readdirSync(env.dir));
  process.kill(sup.proc.pid!, 'SIGUSR2');
  const file = await waitFor(
    'the supervisor to write its heap snapshot',
    () => {
      const f = fs.readdirSync(env.dir).find((n) => n.endsWith('.heapsnapshot') && !before.has(n));
      if (f === undefined) return undefined;
      // Written at once, in one go: whole once it parses.
      try {
        return { path: path.join(env.dir, f), counts: countObjects(path.join(env.dir, f), ['ChildProcess', 'QmpClient']) };
      } catch {
        return undefined;
      }
    },
    30000,
    200,
  );
  fs.rmSync(file.path, { force: true });
  t.diagnostic(`supervisor after 4 cycles: ${JSON.stringify([...file.counts])}`);
  assert.equal(file.counts.get('ChildProcess'), 2, `one process handle per living child (primary ${primary}, secondary ${secondary}); colo up printed: ${sup.timeline()}`);
  assert.equal(file.counts.get('QmpClient'), 4, 'two QMP clients per living child (commands and events; heartbeat)');
  // It still works after the snapshot: the pair is protected, with one disk copy per secondary it runs.
  assert.ok(sup.alive, 'colo up runs on');
  const images = fs.readdirSync(env.dir).filter((n) => /^vm\d+\.img$/.test(n));
  assert.ok(images.length <= 2, `only the living children's disk copies are left: ${images.join(', ')}`);
});
