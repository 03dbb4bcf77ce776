/**
 * A proxy between source and destination corrupts, truncates or reorders the stream, on the
 * main channel (plain migration) or on a multifd channel. The destination must refuse with a
 * typed error and never run the guest; the source must fail and run on.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TestEnv } from '../framework/harness.js';
import { FaultProxy, type Fault, type ProxyOptions } from '../framework/proxy.js';
import { assertAdvancing, memwalkPair, statuses } from './helpers.js';

interface Case {
  name: string;
  proxy: ProxyOptions;
  /** Error codes the destination may name (a cut connection can also surface as CHANNEL_CLOSED on one of several channels). */
  codes: string[];
}

const mib = 1024 * 1024;
const main = (fault: Fault): ProxyOptions => ({ channel: 'main', fault });
const mfd = (fault: Fault): ProxyOptions => ({ channel: 'multifd', fault });

const cases: Case[] = [
  { name: 'main channel: one byte flipped in a page frame', proxy: main({ kind: 'corrupt', atByte: 2 * mib + 12345 }), codes: ['FRAME_CHECKSUM'] },
  { name: 'main channel: truncated inside a frame', proxy: main({ kind: 'truncate', atByte: 3 * mib + 777 }), codes: ['STREAM_TRUNCATED'] },
  { name: 'main channel: two page frames swapped', proxy: main({ kind: 'reorder', index: 20 }), codes: ['FRAME_ORDER'] },
  { name: 'multifd channel: one byte flipped in a packet', proxy: mfd({ kind: 'corrupt', atByte: mib + 4321 }), codes: ['FRAME_CHECKSUM'] },
  { name: 'multifd channel: truncated inside a packet', proxy: mfd({ kind: 'truncate', atByte: 2 * mib + 99 }), codes: ['STREAM_TRUNCATED'] },
  { name: 'multifd channel: two packets swapped', proxy: mfd({ kind: 'reorder', index: 3 }), codes: ['FRAME_ORDER'] },
];

for (const c of cases) {
  test(`refused with a typed error, never a resumed half guest — ${c.name}`, async (t) => {
    const env = new TestEnv(t);
    const multifd = c.proxy.channel === 'multifd';
    const { src, dst, port } = await memwalkPair(env, { capabilities: { multifd }, parameters: multifd ? { 'multifd-channels': 2 } : {} });
    const proxy = await FaultProxy.start(port, c.proxy);
    env.onCleanup(() => proxy.close());
    const mark = src.qmp.eventCount;
    const dstMark = dst.qmp.eventCount;
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${proxy.port}` });
    const srcInfo = await src.waitMigrationStatus('failed', 30000);
    assert.equal(await dst.waitExit(15000), 1, 'the destination exits non-zero');
    const lines = dst.errorLines();
    assert.equal(lines.length, 1, `one error line on the destination: ${dst.stderr}`);
    const code = /\[([A-Z_]+)\]\s*$/.exec(lines[0]!)?.[1];
    assert.ok(code !== undefined && c.codes.includes(code), `destination error ${lines[0]} names one of ${c.codes.join(', ')}`);
    assert.equal(dst.eventsOf('RESUME', dstMark).length, 0, 'the destination never ran the guest');
    assert.ok(!statuses(dst, dstMark).includes('completed'));
    assert.equal(dst.serial(), '', 'the destination guest wrote nothing');
    t.diagnostic(`destination: ${lines[0]}; source: ${String(srcInfo['error-desc'])}`);
    assert.equal(await src.status(), 'running');
    await assertAdvancing(src);
    assert.deepEqual(statuses(src, mark).slice(-1), ['failed']);
  });
}
