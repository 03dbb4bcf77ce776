/**
 * `colo up` (real processes) over many failovers and re-protections: what the long-lived
 * supervisor keeps. Every child it starts comes with a process handle and two QMP clients
 * (commands and events; the heartbeat), each with an event log that gains a STOP and a RESUME
 * per checkpoint. A supervisor that re-protects for years must keep those of its living
 * children only, not of every secondary it ever started, and of their events only the few it
 * may wait for (the heartbeat's connection none).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { sleep, waitFor } from '../framework/harness.js';
import { TestEnv } from '../framework/harness.js';
import { kvUpArgs, protectedLine, spawnSupervisor } from '../framework/up.js';
import { limits } from '../../src/core/limits.js';

/**
 * From a V8 heap snapshot: how many objects of each of `names` (constructor names) it holds,
 * and how many QMP events (QmpClient's log entries: plain objects with the properties event,
 * data and timestamp).
 */
function countObjects(snapshotPath: string, names: readonly string[]): { counts: Map<string, number>; events: number } {
  const snap = JSON.parse(fs.readFileSync(snapshotPath, 'utf8')) as {
    snapshot: { meta: { node_fields: string[]; node_types: [string[]]; edge_fields: string[]; edge_types: [string[]] } };
    nodes: number[];
    edges: number[];
    strings: string[];
  };
  const meta = snap.snapshot.meta;
  const fields = meta.node_fields;
  const [typeAt, nameAt, edgeCountAt] = [fields.indexOf('type'), fields.indexOf('name'), fields.indexOf('edge_count')];
  const objectType = meta.node_types[0].indexOf('object');
  const [edgeTypeAt, edgeNameAt] = [meta.edge_fields.indexOf('type'), meta.edge_fields.indexOf('name_or_index')];
  const propertyEdge = meta.edge_types[0].indexOf('property');
  // (index, a small integer, is no edge in a snapshot)
  const eventKeys = ['event', 'data', 'timestamp'];
  const counts = new Map(names.map((n) => [n, 0]));
  let events = 0;
  let edge = 0;
  for (let i = 0; i < snap.nodes.length; i += fields.length) {
    const edges = snap.nodes[i + edgeCountAt]!;
    const first = edge;
    edge += edges * meta.edge_fields.length;
    if (snap.nodes[i + typeAt] !== objectType) continue;
    const name = snap.strings[snap.nodes[i + nameAt]!]!;
    const n = counts.get(name);
    if (n !== undefined) counts.set(name, n + 1);
    if (name !== 'Object') continue;
    const keys = new Set<string>();
    for (let e = first; e < edge; e += meta.edge_fields.length) {
      if (snap.edges[e + edgeTypeAt] === propertyEdge) keys.add(snap.strings[snap.edges[e + edgeNameAt]!]!);
    }
    if (eventKeys.every((k) => keys.has(k))) events++;
  }
  return { counts, events };
}

/** The supervisor `pid`'s own heap snapshot (NODE_OPTIONS=--heapsnapshot-signal=SIGUSR2), written to its working folder `dir`, counted. */
async function heapCounts(dir: string, pid: number): Promise<{ counts: Map<string, number>; events: number }> {
  const before = new Set(fs.readdirSync(dir));
  process.kill(pid, 'SIGUSR2');
  const file = await waitFor(
    'the supervisor to write its heap snapshot',
    () => {
      const f = fs.readdirSync(dir).find((n) => n.endsWith('.heapsnapshot') && !before.has(n));
      if (f === undefined) return undefined;
      // Written at once, in one go: whole once it parses.
      try {
        return { path: path.join(dir, f), ...countObjects(path.join(dir, f), ['ChildProcess', 'QmpClient']) };
      } catch {
        return undefined;
      }
    },
    30000,
    200,
  );
  fs.rmSync(file.path, { force: true });
  return file;
}

/**
 * The `colo up` of these tests: kv.wasm, 64M, checkpoints every 10 ms (many events), a
 * heartbeat timeout well above the time a heap snapshot stops the supervisor for.
 */
function leakArgs(env: TestEnv): Promise<{ args: string[] }> {
  return kvUpArgs(env, '64M', 10, ['--heartbeat-timeout', '10000']);
}

test('colo up: after 4 failovers and re-protections the supervisor holds the process handles and QMP clients of its 2 living children only, and a bounded log of their events', async (t) => {
  const env = new TestEnv(t);
  const { args } = await leakArgs(env);
  const sup = spawnSupervisor(env, args, undefined, { NODE_OPTIONS: '--heapsnapshot-signal=SIGUSR2' });
  let at = await sup.line(protectedLine, 0, 90000);
  // Each protection ends before it is stable (30 s): failed attempts, retried after 1, 2, 3 s
  // (a fifth in a row would wait 60 s). Both kinds of failover: the secondary dies, the primary dies.
  for (let cycle = 1; cycle <= 4; cycle++) {
    const victim = Number(at.m[cycle % 2 === 1 ? 2 : 1]);
    process.kill(victim, 'SIGKILL');
    at = await sup.line(protectedLine, at.at + 1, 60000);
  }
  const [primary, secondary] = [Number(at.m[1]), Number(at.m[2])];
  // Checkpoints every 10 ms for a while: each child sends a STOP and a RESUME per checkpoint.
  await sleep(15000);
  const file = await heapCounts(env.dir, sup.proc.pid!);
  t.diagnostic(`supervisor after 4 cycles: ${JSON.stringify([...file.counts])}, ${file.events} QMP events`);
  assert.equal(file.counts.get('ChildProcess'), 2, `one process handle per living child (primary ${primary}, secondary ${secondary}); colo up printed: ${sup.timeline()}`);
  assert.equal(file.counts.get('QmpClient'), 4, 'two QMP clients per living child (commands and events; heartbeat)');
  // Of the STOP and RESUME each child sent per checkpoint, the
  // heartbeat's connections keep none, the others their last limits.upQmpEventLogMax.
  const eventsMax = 2 * Math.ceil(limits.upQmpEventLogMax * 1.125);
  assert.ok(file.events <= eventsMax, `the supervisor keeps at most ${eventsMax} QMP events (${limits.upQmpEventLogMax}, and an eighth more, per child), not ${file.events}`);
  // It still works after the snapshot: the pair is protected, with one disk copy per secondary it runs.
  assert.ok(sup.alive, 'colo up runs on');
  const images = fs.readdirSync(env.dir).filter((n) => /^vm\d+\.img$/.test(n));
  assert.ok(images.length <= 2, `only the living children's disk copies are left: ${images.join(', ')}`);
});

test('colo up run again on the --state-dir of one that died: the QMP connections to the children it adopted keep a bounded log of their events too', async (t) => {
  const env = new TestEnv(t);
  const { args } = await leakArgs(env);
  const sup1 = spawnSupervisor(env, args);
  const p1 = await sup1.line(protectedLine, 0, 90000);
  sup1.proc.kill('SIGKILL');
  await sup1.waitExit(10000);
  const sup2 = spawnSupervisor(env, args, undefined, { NODE_OPTIONS: '--heapsnapshot-signal=SIGUSR2' });
  const adopted = await sup2.line(/^pair: adopted \(state in .*\): protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 30000);
  assert.deepEqual([adopted.m[1], adopted.m[2]], [p1.m[1], p1.m[2]], sup2.timeline());
  // Checkpoints every 10 ms for a while: each adopted child sends a STOP and a RESUME per checkpoint.
  await sleep(20000);
  const file = await heapCounts(env.dir, sup2.proc.pid!);
  t.diagnostic(`adopting supervisor after 20 s: ${JSON.stringify([...file.counts])}, ${file.events} QMP events`);
  assert.equal(file.counts.get('QmpClient'), 4, 'two QMP clients per adopted child (commands and events; heartbeat)');
  const eventsMax = 2 * Math.ceil(limits.upQmpEventLogMax * 1.125);
  assert.ok(file.events <= eventsMax, `the supervisor keeps at most ${eventsMax} QMP events of its adopted children, not ${file.events}`);
  assert.ok(sup2.alive, 'colo up runs on');
  sup2.proc.kill('SIGTERM');
  await sup2.line(/^pair: stopped$/, adopted.at, 20000);
  await sup2.waitExit(10000);
});
