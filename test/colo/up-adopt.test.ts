/**
 * A `colo up` that dies (SIGKILL, a crash) leaves its children running: the pair stays in COLO
 * but nothing fails over any more. Run again on the same --state-dir, colo up adopts them
 * (real processes): a protected pair is supervised as it is; a pair whose primary died while no
 * supervisor ran gets the failover it missed. One supervisor per state folder.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { TestEnv, freePort, runProgram, waitFor } from '../framework/harness.js';
import { RespClient } from '../framework/resp.js';
import { type Supervisor, kvUpArgs, pidAlive, pidsUsing, protectedLine, qmpOf, spawnSupervisor, timeUntilServing } from '../framework/up.js';
import { limits } from '../../src/core/limits.js';
import { QmpClient } from '../../src/control/qmp-client.js';

/** The `colo up` command line of these tests (kv.wasm, 64M, an 8 MiB drive, --checkpoint-delay 200), then `extra`. */
function upArgs(env: TestEnv, extra: string[] = []): Promise<{ args: string[]; port: number }> {
  return kvUpArgs(env, '64M', 200, extra);
}

/** `colo up`'s line for a pair it adopted whose primary `pid` runs alone (its partner died, or it took over). */
function adoptedAlone(pid: number): RegExp {
  return new RegExp(`^pair: adopted \\(state in .*\\): primary ${pid} runs unprotected$`);
}

/** Process `pid`'s start time, /proc/PID/stat field 22. */
function startTime(pid: number): string {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]!;
}

async function command(port: number, argv: string[]): Promise<string | number | null> {
  const c = await RespClient.connect(port, '127.0.0.1', 5000);
  try {
    return (await c.command(argv, 5000)) as string | number | null;
  } finally {
    c.close();
  }
}

/**
 * A protected pair (upArgs) whose colo up (`sup1`) was SIGKILLed after `key` was set to
 * `value`, acknowledged: its children run on, unsupervised.
 */
async function orphanedPair(env: TestEnv, key = 'k', value = 'acknowledged'): Promise<{ args: string[]; port: number; sup1: Supervisor; primary: number; secondary: number }> {
  const { args, port } = await upArgs(env);
  const sup1 = spawnSupervisor(env, args);
  const p1 = await sup1.line(protectedLine, 0, 90000);
  const [primary, secondary] = [Number(p1.m.at(1)), Number(p1.m.at(2))];
  assert.equal(await command(port, ['SET', key, value]), 'OK');
  sup1.proc.kill('SIGKILL');
  await sup1.waitExit(10000);
  return { args, port, sup1, primary, secondary };
}

/**
 * A relay in front of child `vm`'s QMP socket (moved aside to the path returned): what the
 * child sends goes through `rewrite` line by line, so a test can make it say what a rare
 * failure would (its COLO_EXIT's reason, its run state). Closed at cleanup.
 */
async function qmpRelay(env: TestEnv, vm: 'vm1' | 'vm2', rewrite: (line: string) => string): Promise<string> {
  const sock = path.join(env.dir, `${vm}.qmp`);
  const real = `${sock}.real`;
  fs.renameSync(sock, real);
  const relayed = new Set<net.Socket>();
  const relay = net.createServer((from) => {
    const to = net.connect(real);
    relayed.add(from).add(to);
    from.pipe(to);
    let partial = '';
    to.on('data', (d: Buffer) => {
      const lines = (partial + d.toString('utf8')).split('\n');
      partial = lines.pop()!;
      for (const l of lines) from.write(`${rewrite(l)}\n`);
    });
    from.on('error', () => to.destroy()).on('close', () => to.destroy());
    to.on('error', () => from.destroy()).on('close', () => from.destroy());
  });
  await new Promise<void>((r) => relay.listen(sock, r));
  env.onCleanup(async () => {
    for (const s of relayed) s.destroy();
    await new Promise<void>((r) => relay.close(() => r()));
  });
  return real;
}

/** A QMP line as a VM whose guest does not run (internal-error) would send it. */
function failedGuest(line: string): string {
  return line.replace(/"status":\s*"running"/g, '"status":"internal-error"').replace(/"running":\s*true/g, '"running":false');
}

/**
 * A rewrite for qmpRelay: every line through `also`, and from the child's COLO_EXIT on, as a
 * VM whose guest does not run says it (failedGuest); `left()`: whether COLO_EXIT came.
 */
function failedAfterColoExit(also: (line: string) => string = (l) => l): { rewrite: (line: string) => string; left: () => boolean } {
  let left = false;
  const rewrite = (l: string): string => {
    if (/"COLO_EXIT"/.test(l)) left = true;
    const line = also(l);
    return left ? failedGuest(line) : line;
  };
  return { rewrite, left: () => left };
}

/**
 * A colo up run on `args` adopts the pair whose primary `survivor` runs alone, serves `k` as
 * acknowledged, and protects it again.
 */
async function adoptsAlone(env: TestEnv, args: string[], port: number, survivor: number): Promise<Supervisor> {
  const sup = spawnSupervisor(env, args);
  const adopted = await sup.line(adoptedAlone(survivor), 0, 30000);
  assert.equal(await command(port, ['GET', 'k']), 'acknowledged');
  await sup.line(protectedLine, adopted.at, 90000);
  return sup;
}

test('colo up killed, then run again on its --state-dir: it adopts the protected pair (one supervisor per folder), fails over when the adopted primary dies, and stops the adopted children', async (t) => {
  const env = new TestEnv(t);
  const { args, port, primary, secondary } = await orphanedPair(env, 'before', 'one');
  assert.ok(pidAlive(primary) && pidAlive(secondary), 'the children live on without their supervisor');
  assert.equal(await command(port, ['GET', 'before']), 'one', 'the service goes on');

  const sup2 = spawnSupervisor(env, args);
  const adopted = await sup2.line(/^pair: adopted \(state in .*\): protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 30000);
  assert.deepEqual([Number(adopted.m.at(1)), Number(adopted.m.at(2))], [primary, secondary], sup2.timeline());
  assert.equal(fs.readFileSync(path.join(env.dir, 'up.pid'), 'utf8').trim(), `${sup2.proc.pid} ${startTime(sup2.proc.pid!)}`, 'its pid and start time');

  // A second supervisor for the same folder is refused; the pair is not touched.
  const r = await runProgram(process.execPath, args, { timeoutMs: 30000 });
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, new RegExp(`colo up ${sup2.proc.pid} supervises the pair there`));
  assert.ok(pidAlive(primary) && pidAlive(secondary));

  // The adopted primary dies: the adopted secondary takes over, every acknowledged write is there.
  assert.equal(await command(port, ['SET', 'adopted', 'two']), 'OK');
  const killedAt = performance.now();
  process.kill(primary, 'SIGKILL');
  const took = await sup2.line(new RegExp(`^pair: primary died \\(.*\\); secondary ${secondary} took over`), adopted.at, 15000);
  const servingMs = await timeUntilServing(port, killedAt, 10000);
  assert.ok(servingMs < 2000, `the service answered again ${servingMs.toFixed(0)} ms after the primary's SIGKILL`);
  assert.equal(await command(port, ['GET', 'before']), 'one');
  assert.equal(await command(port, ['GET', 'adopted']), 'two');
  const again = await sup2.line(protectedLine, took.at, 90000);
  assert.equal(Number(again.m.at(1)), secondary, 'protected again, with a new secondary');
  const newSecondary = Number(again.m.at(2));
  assert.ok(fs.existsSync(path.join(env.dir, 'vm3.qmp')), 'the new secondary has a name the folder never had (vm3)');

  // SIGTERM stops the adopted primary and the new secondary, and removes the supervisor's pid file.
  sup2.proc.kill('SIGTERM');
  await sup2.line(/^pair: stopped$/, again.at, 20000);
  await sup2.waitExit(10000);
  assert.equal(sup2.exitCode, 0, sup2.stderr.slice(-2000));
  await waitFor('the children to be gone', () => !pidAlive(secondary) && !pidAlive(newSecondary), 10000);
  assert.ok(!fs.existsSync(path.join(env.dir, 'up.pid')));
});

test('colo up run again after its primary died while no supervisor ran: the adopted secondary gets the failover it missed, serves every acknowledged write, and is protected again', async (t) => {
  const env = new TestEnv(t);
  const { args, port, primary, secondary } = await orphanedPair(env);
  process.kill(primary, 'SIGKILL');
  await waitFor('the primary to be gone', () => !pidAlive(primary), 10000);
  // The secondary waits for x-colo-lost-heartbeat: nothing serves.
  await assert.rejects(command(port, ['GET', 'k']));

  const sup2 = await adoptsAlone(env, args, port, secondary);
  assert.match(sup2.stderr, /in COLO without its partner/);
  assert.doesNotMatch(sup2.stderr, / error /, sup2.stderr.slice(-3000));
});

/**
 * A pair whose supervisor was SIGKILLed right after it started re-protecting (a new secondary
 * booting, maybe without its pid file yet), after its primary died with `k` acknowledged.
 */
async function killedWhileReprotecting(env: TestEnv): Promise<{ args: string[]; port: number; survivor: number; booting: number }> {
  const { args, port } = await upArgs(env);
  const sup1 = spawnSupervisor(env, args);
  const p1 = await sup1.line(protectedLine, 0, 90000);
  const [primary, secondary] = [Number(p1.m.at(1)), Number(p1.m.at(2))];
  assert.equal(await command(port, ['SET', 'k', 'acknowledged']), 'OK');
  process.kill(primary, 'SIGKILL');
  await sup1.line(/^pair: re-protecting$/, p1.at, 15000);
  // The line is written before the new secondary is spawned (its disk image made first): a
  // SIGKILL at once, on a loaded host, could come before the spawn, and no secondary would boot.
  const booting = await waitFor(`the new secondary to run; colo up printed: ${sup1.timeline()}`, () => pidsUsing(env.dir).find((p) => p !== secondary), 10000);
  sup1.proc.kill('SIGKILL');
  await sup1.waitExit(10000);
  return { args, port, survivor: secondary, booting };
}

test('colo up killed while it re-protects (a new secondary booting), run again at once: that secondary is not left running orphaned, and the pair ends protected with every acknowledged write', async (t) => {
  const env = new TestEnv(t);
  const { args, port, survivor, booting } = await killedWhileReprotecting(env);
  const sup2 = spawnSupervisor(env, args);
  const adopted = await sup2.line(adoptedAlone(survivor), 0, 30000);
  const again = await sup2.line(protectedLine, adopted.at, 90000);
  assert.equal(Number(again.m.at(1)), survivor);
  const newSecondary = Number(again.m.at(2));
  assert.equal(await command(port, ['GET', 'k']), 'acknowledged');
  await waitFor(`the secondary sup1 was booting (pid ${booting}) to be gone or supervised; colo run processes: ${pidsUsing(env.dir).join(', ')}`, () => !pidAlive(booting) || booting === newSecondary || undefined, 10000);
  assert.deepEqual(pidsUsing(env.dir).sort(), [survivor, newSecondary].sort(), 'the pair is the only colo run left in the folder');
});

test('two colo up started at once on the folder of one that died: one adopts the children, the other is refused and touches nothing', async (t) => {
  const env = new TestEnv(t);
  const { args, port, survivor } = await killedWhileReprotecting(env);
  const [a, b] = [spawnSupervisor(env, args), spawnSupervisor(env, args)];
  await waitFor('one of the two to exit', () => !a.alive || !b.alive || undefined, 30000);
  const [refused, running] = a.alive ? [b, a] : [a, b];
  assert.notEqual(refused.exitCode, 0);
  assert.match(refused.stderr, new RegExp(`colo up ${running.proc.pid} supervises the pair there`), refused.stderr);
  assert.deepEqual(refused.lines, [], 'the refused one printed no state');
  const adopted = await running.line(adoptedAlone(survivor), 0, 30000);
  await running.line(protectedLine, adopted.at, 90000);
  assert.equal(await command(port, ['GET', 'k']), 'acknowledged');
  assert.equal(fs.readFileSync(path.join(env.dir, 'up.pid'), 'utf8').trim(), `${running.proc.pid} ${startTime(running.proc.pid!)}`);
});

test('an adopted child that dies is seen at once, also while init has not reaped it yet: the adopted secondary, then the adopted primary', async (t) => {
  const env = new TestEnv(t);
  const { args, port, primary, secondary } = await orphanedPair(env);
  const sup2 = spawnSupervisor(env, args);
  const adopted = await sup2.line(/^pair: adopted \(state in .*\): protected/, 0, 30000);

  // Neither is this supervisor's child: their ends show only as their pids going (or zombies).
  let killedAt = performance.now();
  process.kill(secondary, 'SIGKILL');
  // Its status (SIGKILL) went to init: unknown, and not said as "exited" (a clean end).
  const alone = await sup2.line(new RegExp(`^pair: secondary died \\(exit status unknown\\); primary ${primary} continues unprotected$`), adopted.at, 15000);
  const aloneMs = performance.now() - killedAt;
  const again = await sup2.line(protectedLine, alone.at, 90000);
  killedAt = performance.now();
  process.kill(primary, 'SIGKILL');
  await sup2.line(new RegExp(`^pair: primary died \\(exit status unknown\\); secondary ${again.m.at(2)} took over`), again.at, 15000);
  const tookMs = performance.now() - killedAt;
  assert.ok(aloneMs < 700 && tookMs < 700, `the deaths were acted on after ${aloneMs.toFixed(0)} ms and ${tookMs.toFixed(0)} ms`);
  assert.equal(await command(port, ['GET', 'k']), 'acknowledged');
});

test('colo up (multifd) killed during the initial migration into COLO, run again: the half-migrated secondary is killed, the primary protected again with a new one, nothing left behind', async (t) => {
  const env = new TestEnv(t);
  const { args, port } = await upArgs(env, ['--parallel-connections', '2']);
  const sup1 = spawnSupervisor(env, args);
  const m = await waitFor('the initial migration to start', () => /protecting: migrating primary (\d+) into secondary (\d+)/.exec(sup1.stderr) ?? undefined, 90000);
  const [primary, secondary] = [Number(m[1]), Number(m[2])];
  sup1.proc.kill('SIGKILL');
  await sup1.waitExit(10000);
  assert.equal(await command(port, ['SET', 'k', 'acknowledged']), 'OK', 'the primary serves alone');

  const sup2 = spawnSupervisor(env, args);
  const adopted = await sup2.line(/^pair: adopted \(state in .*\): (.*)$/, 0, 30000);
  const again = await sup2.line(protectedLine, adopted.at, 90000);
  assert.equal(Number(again.m.at(1)), primary, sup2.timeline());
  const newSecondary = Number(again.m.at(2));
  assert.notEqual(newSecondary, secondary);
  await waitFor('the half-migrated secondary to be gone', () => !pidAlive(secondary) || undefined, 10000);
  assert.deepEqual(pidsUsing(env.dir).sort(), [primary, newSecondary].sort());
  assert.equal(await command(port, ['GET', 'k']), 'acknowledged');
  assert.deepEqual(fs.readdirSync(env.dir).filter((f) => /^vm2\./.test(f) && f !== 'vm2.serial'), [], 'the killed secondary left no socket, pid file or disk');
});

test('colo up run again with other options than the pair it would adopt (--memory, --net, --drive) is refused in one line, and the pair runs on untouched; with the same options it adopts it', async (t) => {
  const env = new TestEnv(t);
  const { args, port, primary, secondary } = await orphanedPair(env);
  const other = await freePort();
  const variants: [string[], RegExp][] = [
    [args.map((a) => (a === '64M' ? '128M' : a)), /runs with --memory 64M, this colo up has --memory 128M/],
    [args.map((a) => (a === `listen=127.0.0.1:${port}` ? `listen=127.0.0.1:${other}` : a)), new RegExp(`runs with --net listen=127\\.0\\.0\\.1:${port}, this colo up has --net listen=127\\.0\\.0\\.1:${other}`)],
    [args.filter((a, i) => a !== '--drive' && args[i - 1] !== '--drive'), /runs with --drive file=.*, this colo up has none/],
  ];
  for (const [argv, why] of variants) {
    const r = await runProgram(process.execPath, argv, { timeoutMs: 30000, cwd: env.dir });
    assert.notEqual(r.code, 0, r.stderr);
    assert.match(r.stderr, why);
    assert.match(r.stderr, /cannot adopt the children of the colo up that ran there: .*; they are left running/);
    assert.equal(r.stdout, '');
    assert.ok(pidAlive(primary) && pidAlive(secondary), 'the pair is untouched');
    assert.ok(!fs.existsSync(path.join(env.dir, 'up.pid')), 'the refused colo up leaves no up.pid');
  }
  assert.equal(await command(port, ['GET', 'k']), 'acknowledged');
  const sup2 = spawnSupervisor(env, args);
  const adopted = await sup2.line(/^pair: adopted \(state in .*\): protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 30000);
  assert.deepEqual([Number(adopted.m.at(1)), Number(adopted.m.at(2))], [primary, secondary]);
});

test('colo up killed with the reader of its log (its stderr pipe closed): the children it leaves live on without their log, and are adopted', async (t) => {
  const env = new TestEnv(t);
  const { args, port, sup1, primary, secondary } = await orphanedPair(env);
  // The children write their log to the stderr they inherited: nobody reads it any more.
  sup1.proc.stderr!.destroy();
  process.kill(primary, 'SIGKILL');
  await waitFor('the primary to be gone', () => !pidAlive(primary) || undefined, 10000);
  await new Promise((r) => setTimeout(r, 500));
  assert.ok(pidAlive(secondary), 'the secondary lives on after its partner died (it logged that, to a closed pipe)');
  await adoptsAlone(env, args, port, secondary);
});

test('colo up (no --drive) killed while its children boot, run again at once: it waits for them and adopts them (the booting secondary replaced), no second pair, nothing orphaned', async (t) => {
  const env = new TestEnv(t);
  const { args, port } = await upArgs(env);
  const noDrive = args.filter((a, i) => a !== '--drive' && args[i - 1] !== '--drive');
  const sup1 = spawnSupervisor(env, noDrive);
  await sup1.line(/^pair: starting/, 0, 30000);
  const booted = await waitFor('both children to run', () => (pidsUsing(env.dir).length === 2 ? pidsUsing(env.dir) : undefined), 10000);
  sup1.proc.kill('SIGKILL');
  await sup1.waitExit(10000);
  assert.ok(!fs.existsSync(path.join(env.dir, 'vm1.qmp')) || !fs.existsSync(path.join(env.dir, 'vm2.qmp')), 'killed while they booted');
  const sup2 = spawnSupervisor(env, noDrive);
  const adopted = await sup2.line(/^pair: adopted \(state in .*\): primary (\d+) runs unprotected$/, 0, 90000);
  const primary = Number(adopted.m.at(1));
  assert.ok(booted.includes(primary), `the adopted primary is one sup1 started (${booted.join(', ')}): ${sup2.timeline()}`);
  const again = await sup2.line(protectedLine, adopted.at, 90000);
  assert.equal(Number(again.m.at(1)), primary);
  assert.equal(await command(port, ['SET', 'k', 'v']), 'OK');
  await waitFor('only the pair to run', () => pidsUsing(env.dir).length === 2 || undefined, 10000);
  assert.deepEqual(pidsUsing(env.dir).sort(), [primary, Number(again.m.at(2))].sort());
});

test('colo up adopting a secondary whose primary died, which stalls (SIGSTOP) when told x-colo-lost-heartbeat: the adoption is given up after limits.upAdoptFailoverMs with the reason, the children left running; a later run adopts it', async (t) => {
  const env = new TestEnv(t);
  const { args, port, primary, secondary } = await orphanedPair(env);
  process.kill(primary, 'SIGKILL');
  await waitFor('the primary to be gone', () => !pidAlive(primary) || undefined, 10000);
  env.onCleanup(() => {
    if (pidAlive(secondary)) process.kill(secondary, 'SIGCONT');
  });
  // The secondary's QMP socket, behind a relay that stops the secondary the moment it is told
  // x-colo-lost-heartbeat (then passes the command on): a stall at that very point.
  const sock = path.join(env.dir, 'vm2.qmp');
  const real = `${sock}.real`;
  fs.renameSync(sock, real);
  const relayed = new Set<net.Socket>();
  const relay = net.createServer((from) => {
    const to = net.connect(real);
    relayed.add(from).add(to);
    from.on('data', (d: Buffer) => {
      if (d.includes('x-colo-lost-heartbeat') && pidAlive(secondary)) process.kill(secondary, 'SIGSTOP');
      to.write(d);
    });
    to.pipe(from);
    from.on('error', () => to.destroy()).on('close', () => to.destroy());
    to.on('error', () => from.destroy()).on('close', () => from.destroy());
  });
  await new Promise<void>((r) => relay.listen(sock, r));
  const closeRelay = async (): Promise<void> => {
    for (const s of relayed) s.destroy();
    await new Promise<void>((r) => relay.close(() => r()));
  };
  env.onCleanup(closeRelay);

  const startedAt = performance.now();
  const sup2 = spawnSupervisor(env, args);
  await sup2.waitExit(limits.upAdoptFailoverMs + 3 * limits.upFailoverTimeoutMs);
  const tookMs = performance.now() - startedAt;
  assert.notEqual(sup2.exitCode, 0, sup2.stderr.slice(-3000));
  assert.match(sup2.stderr, new RegExp(`cannot adopt the children of the colo up that ran there: x-colo-lost-heartbeat on vm2 failed \\(vm2 \\(pid ${secondary}\\) has not carried out x-colo-lost-heartbeat for ${limits.upAdoptFailoverMs} ms \\(stopped, or hung\\?\\)\\); they are left running`), sup2.stderr.slice(-3000));
  assert.ok(tookMs >= limits.upAdoptFailoverMs, `given up after ${tookMs.toFixed(0)} ms`);
  assert.deepEqual(sup2.lines, [], 'it printed no state');
  assert.ok(pidAlive(secondary), 'the stalled secondary is left running');
  assert.ok(!fs.existsSync(path.join(env.dir, 'up.pid')));

  // It runs again: the next colo up adopts it (it carried out the failover it was told).
  process.kill(secondary, 'SIGCONT');
  await closeRelay();
  fs.rmSync(sock, { force: true });
  fs.renameSync(real, sock);
  await adoptsAlone(env, args, port, secondary);
});

test('up.pid names a process by its pid and start time: a live colo up there is refused; a pid the system gave again to another colo up (another start time) is stale', async (t) => {
  const env = new TestEnv(t);
  const { args, port } = await upArgs(env);
  // Another live colo up, as /proc tells it (its command line says up), cheap: it runs nothing.
  const other = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)', 'up'], { stdio: 'ignore' });
  env.onCleanup(() => {
    other.kill('SIGKILL');
  });
  await waitFor('the other process to run', () => (other.pid !== undefined && pidAlive(other.pid)) || undefined, 5000);
  const pid = other.pid!;
  const upPid = path.join(env.dir, 'up.pid');
  // The service address is held here: a run that takes the folder stops at that next check,
  // before it starts anything.
  const holder = net.createServer();
  await new Promise<void>((r) => holder.listen({ host: '127.0.0.1', port }, r));
  env.onCleanup(() => new Promise<void>((r) => holder.close(() => r())));
  // It holds the folder: refused.
  fs.writeFileSync(upPid, `${pid} ${startTime(pid)}\n`);
  const refused = await runProgram(process.execPath, args, { timeoutMs: 30000 });
  assert.notEqual(refused.code, 0);
  assert.match(refused.stderr, new RegExp(`colo up ${pid} supervises the pair there`), refused.stderr);
  assert.equal(fs.readFileSync(upPid, 'utf8'), `${pid} ${startTime(pid)}\n`, 'its up.pid is left alone');
  // The up.pid of one that died, whose pid the other got since: the folder is taken.
  fs.writeFileSync(upPid, `${pid} ${Number(startTime(pid)) - 1}\n`);
  const taken = await runProgram(process.execPath, args, { timeoutMs: 30000 });
  assert.notEqual(taken.code, 0);
  assert.doesNotMatch(taken.stderr, /supervises the pair there/, taken.stderr);
  assert.match(taken.stderr, /cannot listen there/, taken.stderr);
  assert.ok(!fs.existsSync(upPid), 'the stale up.pid was taken, then removed with the run');
});

test('colo up run again with another --checkpoint-delay adopts the protected pair and its primary checkpoints with the new delay from then on', async (t) => {
  const env = new TestEnv(t);
  const { args, port, primary } = await orphanedPair(env);
  const sup2 = spawnSupervisor(env, args.map((a) => (a === '200' ? '700' : a)));
  await sup2.line(/^pair: adopted \(state in .*\): protected/, 0, 30000);
  const q = await qmpOf(primary, sup2);
  try {
    const params = await q.execute<{ 'x-checkpoint-delay': number }>('query-migrate-parameters');
    assert.equal(params['x-checkpoint-delay'], 700, `the adopted primary has this run's delay; ${sup2.stderr.slice(-2000)}`);
  } finally {
    await q.close();
  }
  assert.match(sup2.stderr, /x-checkpoint-delay 200 ms, now 700 ms/);
  assert.equal(await command(port, ['GET', 'k']), 'acknowledged');
});

test('colo up adopting a secondary whose primary died, whose takeover fails (COLO_EXIT reason error): not adopted as a primary that serves; the failure is said with its reason', async (t) => {
  const env = new TestEnv(t);
  const { args, primary, secondary } = await orphanedPair(env);
  env.onCleanup(() => {
    if (pidAlive(secondary)) process.kill(secondary, 'SIGKILL');
  });
  process.kill(primary, 'SIGKILL');
  await waitFor('the primary to be gone', () => !pidAlive(primary) || undefined, 10000);
  // The secondary's QMP socket, behind a relay that makes its exit from COLO one that failed
  // (reason error, as a takeover whose guest cannot run says it; a real one needs a guest that
  // crashes in the very apply a failover waits for).
  await qmpRelay(env, 'vm2', (l) => l.replace(/"reason":\s*"request"/g, '"reason":"error"'));

  const sup2 = spawnSupervisor(env, args);
  const exited = sup2.waitExit(limits.upAdoptFailoverMs + 3 * limits.upFailoverTimeoutMs).then(() => 'exited');
  const adopted = sup2.line(adoptedAlone(secondary), 0, limits.upAdoptFailoverMs + 3 * limits.upFailoverTimeoutMs).then(() => 'adopted', () => 'no line');
  assert.equal(await Promise.race([exited, adopted]), 'exited', `a secondary that did not take over was adopted as the serving primary\n${sup2.timeline()}`);
  assert.notEqual(sup2.exitCode, 0, sup2.stderr.slice(-3000));
  assert.match(sup2.stderr, new RegExp(`x-colo-lost-heartbeat on vm2 failed \\(vm2 \\(pid ${secondary}\\) left COLO with reason error: it did not take over`), sup2.stderr.slice(-3000));
  assert.deepEqual(sup2.lines, [], 'it printed no state');
});

test('colo up whose secondary dies, and whose primary cannot go on alone (COLO_EXIT reason error, its guest in internal-error): the service is said lost, not "primary continues unprotected"', async (t) => {
  const env = new TestEnv(t);
  const { args, primary, secondary } = await orphanedPair(env);
  env.onCleanup(() => {
    for (const pid of [primary, secondary]) if (pidAlive(pid)) process.kill(pid, 'SIGKILL');
  });
  // The primary's QMP socket, behind a relay that makes its failover one that could not run
  // its guest (reason error, run state internal-error, as colo/core.ts resumeFailed leaves it;
  // a real one needs a guest that crashes in the very checkpoint a failover waits for).
  const primaryExit = failedAfterColoExit((l) => l.replace(/"reason":\s*"request"/g, '"reason":"error"'));
  await qmpRelay(env, 'vm1', primaryExit.rewrite);

  const sup2 = spawnSupervisor(env, args);
  await sup2.line(/^pair: adopted .*: protected/, 0, 30000);
  process.kill(secondary, 'SIGKILL');
  await sup2.waitExit(3 * limits.upFailoverTimeoutMs + 20000);
  assert.ok(primaryExit.left(), `the primary left COLO\n${sup2.timeline()}`);
  assert.equal(sup2.exitCode, 1, sup2.stderr.slice(-3000));
  assert.ok(!sup2.lines.some((l) => /continues unprotected/.test(l)), sup2.timeline());
  assert.ok(
    sup2.lines.some((l) => new RegExp(`^pair: failed \\(primary ${primary} could not go on alone after its secondary died .*its guest does not run \\(state internal-error\\)`).test(l)),
    sup2.timeline(),
  );
  assert.match(sup2.stderr, /the service is lost/);
});

test('colo up whose primary leaves COLO by itself (its link broke) and cannot run its guest (internal-error): the primary is fenced and the secondary takes over, serving every acknowledged write', async (t) => {
  const env = new TestEnv(t);
  const { args, port, primary, secondary } = await orphanedPair(env);
  env.onCleanup(() => {
    for (const pid of [primary, secondary]) if (pidAlive(pid)) process.kill(pid, 'SIGKILL');
  });
  // The primary's QMP socket behind a relay that, once it left COLO, says its guest does not
  // run (as colo/core.ts resumeFailed leaves it; a real one needs a guest that crashes in the
  // very checkpoint its failover waits for).
  const primaryExit = failedAfterColoExit();
  const real = await qmpRelay(env, 'vm1', primaryExit.rewrite);

  const sup2 = spawnSupervisor(env, args);
  const adopted = await sup2.line(/^pair: adopted .*: protected/, 0, 30000);
  const direct = await QmpClient.connect(`unix:${real}`, { timeoutMs: 5000 });
  env.onCleanup(() => direct.close());
  await direct.execute('yank', { instances: [{ type: 'migration' }] });
  const took = await sup2.line(new RegExp(`^pair: primary died \\(killed: left COLO \\(reason error\\) and its guest does not run\\); secondary ${secondary} took over`), adopted.at + 1, 30000);
  assert.ok(primaryExit.left());
  assert.ok(!sup2.lines.some((l) => /continues unprotected/.test(l)), sup2.timeline());
  await waitFor('the fenced primary to be gone', () => !pidAlive(primary) || undefined, 10000);
  assert.equal(await command(port, ['GET', 'k']), 'acknowledged');
  await sup2.line(protectedLine, took.at + 1, 90000);
  sup2.proc.kill('SIGTERM');
  await sup2.waitExit(20000);
});

test('colo up run again just as a re-protection switches into COLO (the primary in finish-migrate, COLO mode none; the secondary in COLO already): it looks again, and adopts the protected pair instead of refusing it', async (t) => {
  const env = new TestEnv(t);
  const { args, port, primary, secondary } = await orphanedPair(env);
  // The primary's first two looks say what a primary in its switchover says (a chaos run caught
  // colo up restarted in that moment refused with status 2 for a state gone milliseconds later).
  let modes = 0;
  let states = 0;
  await qmpRelay(env, 'vm1', (l) => {
    if (/"return"/.test(l) && /"last-mode"/.test(l) && modes++ < 2) return l.replace(/"mode":\s*"primary"/, '"mode":"none"');
    if (/"return"/.test(l) && /"singlestep"/.test(l) && states++ < 2) return l.replace(/"status":\s*"running"/, '"status":"finish-migrate"').replace(/"running":\s*true/, '"running":false');
    return l;
  });
  const sup2 = spawnSupervisor(env, args);
  const adopted = await sup2.line(/^pair: adopted \(state in .*\): protected \(primary pid (\d+), secondary pid (\d+)\)$/, 0, 30000);
  assert.deepEqual([Number(adopted.m.at(1)), Number(adopted.m.at(2))], [primary, secondary], sup2.timeline());
  assert.ok(modes >= 3 && states >= 3, `the primary was looked at again (${modes} COLO modes, ${states} run states read)`);
  assert.equal(await command(port, ['GET', 'k']), 'acknowledged');
  sup2.proc.kill('SIGTERM');
  await sup2.line(/^pair: stopped$/, adopted.at, 20000);
  await sup2.waitExit(10000);
  assert.equal(sup2.exitCode, 0, sup2.stderr.slice(-2000));
});
