/**
 * Client input events share one hidden class (V8 map). An object spread made V8 build a new
 * map and descriptor array for every request ({...ev, seq}): old-space garbage on the path of
 * every request, and megamorphic reads of every event. Checked in a child process with V8's
 * natives syntax (%HaveSameMap), over real client sockets.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const frontend = pathToFileURL(path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../src/net/frontend.js')).href;

const script = `
const net = require('node:net');
(async () => {
  const { FrontEnd } = await import(${JSON.stringify(frontend)});
  const events = [];
  const fe = new FrontEnd({ host: '127.0.0.1', port: 0 }, (ev) => events.push(ev));
  await fe.listen();
  const clients = [];
  for (let i = 0; i < 2; i++) {
    const s = net.connect({ port: fe.boundPort(), host: '127.0.0.1' });
    await new Promise((r, j) => { s.once('connect', r); s.once('error', j); });
    clients.push(s);
  }
  for (let round = 0; round < 20; round++) {
    for (const s of clients) s.write('PING ' + round + '\\r\\n');
    await new Promise((r) => setTimeout(r, 5));
  }
  const deadline = Date.now() + 5000;
  while (events.filter((e) => e.kind === 'data').length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  const data = events.filter((e) => e.kind === 'data');
  const opens = events.filter((e) => e.kind === 'open');
  const same = (list) => list.every((e) => %HaveSameMap(e, list[0]));
  console.log(JSON.stringify({ data: data.length, opens: opens.length, dataSame: same(data), opensSame: same(opens) }));
  for (const s of clients) s.destroy();
  await fe.close();
})().catch((err) => { console.error(err); process.exit(1); });
`;

test('front end: every client input event of a kind has the same hidden class', () => {
  const r = spawnSync(process.execPath, ['--allow-natives-syntax', '-e', script], { encoding: 'utf8', timeout: 20000 });
  assert.equal(r.status, 0, `child failed (signal ${r.signal}): ${r.stderr}`);
  const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as { data: number; opens: number; dataSame: boolean; opensSame: boolean };
  assert.ok(out.data >= 2, `data events seen: ${out.data}`);
  assert.equal(out.opens, 2);
  assert.equal(out.dataSame, true, 'data events share one map');
  assert.equal(out.opensSame, true, 'open events share one map');
});
