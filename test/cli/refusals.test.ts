import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import binaryen from 'binaryen';
import { TestEnv, coloBin, freePort, guests, pidAlive, pidsUsing, runProgram } from '../framework/harness.js';
import { loadGuest } from '../../src/machine/instrument.js';

async function colo(args: string[], cwd?: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return runProgram(process.execPath, [coloBin, ...args], { timeoutMs: 30000, ...(cwd === undefined ? {} : { cwd }) });
}

function watModule(text: string): Uint8Array {
  const m = binaryen.parseText(text);
  try {
    return m.emitBinary();
  } finally {
    m.dispose();
  }
}

test('a guest importing anything outside WASI is refused at load, naming the import', async (t) => {
  const env = new TestEnv(t);
  const file = env.file('bad.wasm');
  fs.writeFileSync(file, watModule(`(module (import "env" "foo" (func $foo)) (memory 1) (export "memory" (memory 0)) (func (export "_start") (call $foo)))`));
  const r = await colo(['run', file]);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /env\.foo/);
  assert.equal(r.stderr.trim().split('\n').length, 1, `one clear line, got: ${r.stderr}`);
  const garbage = env.file('garbage.wasm');
  fs.writeFileSync(garbage, 'this is not wasm');
  const g = await colo(['run', garbage]);
  assert.notEqual(g.code, 0);
  assert.match(g.stderr, /not a WebAssembly module|invalid|magic/i);
  // colo up refuses it once, before it starts any child.
  const u = await colo(['up', file, '--net', 'listen=127.0.0.1:1', '--state-dir', env.file('up-state')]);
  assert.equal(u.code, 2, u.stderr);
  assert.match(u.stderr, /env\.foo/);
  assert.equal(u.stderr.trim().split('\n').length, 1, `one clear line, got: ${u.stderr}`);
  assert.equal(u.stdout, '', 'no pair was started');
});

test('guest memory the host cannot reserve (an address-space limit) is one clear line and exit status 1, not an internal error', async (t) => {
  const env = new TestEnv(t);
  // Instrumented here first: binaryen does not start in the child's address space.
  await loadGuest(guests.spin, { storeLog: true });
  // The memory's maximum is reserved at once (4 GiB and guard pages); Node itself runs in 3 GiB.
  const r = await runProgram('bash', ['-c', 'ulimit -v 3500000 && exec "$0" "$@"', process.execPath, coloBin, 'run', guests.spin, '--memory', '4095M', '--serial', `file:${env.file('serial')}`], { timeoutMs: 30000 });
  assert.equal(r.code, 1, `exit status 1; stderr: ${r.stderr}`);
  assert.match(r.stderr, /^colo run: cannot set up guest memory: reserving 4095 MiB \(--memory\) failed: /);
  assert.equal(r.stderr.trim().split('\n').length, 1, `one clear line, got: ${r.stderr}`);
});

test('colo up on a service address that is in use: one clear line, no pair started', async (t) => {
  const env = new TestEnv(t);
  const taken = net.createServer();
  await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
  env.onCleanup(() => new Promise<void>((resolve) => taken.close(() => resolve())));
  const port = (taken.address() as net.AddressInfo).port;
  const r = await colo(['up', guests.kv, '--net', `listen=127.0.0.1:${port}`, '--state-dir', env.file('up-state')]);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, new RegExp(`--net listen=127\\.0\\.0\\.1:${port}: cannot listen there: it is in use`));
  assert.equal(r.stderr.trim().split('\n').length, 1, `one clear line, got: ${r.stderr}`);
  assert.equal(r.stdout, '', 'no pair was started');
});

test("colo up on a state folder it cannot use, or that holds an earlier run's disk image or a running child's QMP socket: one clear line, nothing overwritten, no pair started", async (t) => {
  const env = new TestEnv(t);
  // Without the checks a pair would start here: whatever it left is killed.
  env.onCleanup(() => {
    for (const pid of pidsUsing(env.dir)) if (pidAlive(pid)) process.kill(pid, 'SIGKILL');
  });
  const port = await freePort();
  const up = (stateDir: string[], extra: string[] = [], environment?: Record<string, string>) =>
    runProgram(process.execPath, [coloBin, 'up', guests.kv, '--net', `listen=127.0.0.1:${port}`, '--memory', '64M', ...stateDir, ...extra], { timeoutMs: 15000, ...(environment === undefined ? {} : { env: environment }) });
  const refused = (r: { code: number | null; stdout: string; stderr: string }, re: RegExp): void => {
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr.trim(), re);
    assert.doesNotMatch(r.stderr, /internal error/);
    assert.equal(r.stderr.trim().split('\n').length, 1, `one clear line, got: ${r.stderr}`);
    assert.equal(r.stdout, '', 'no pair was started');
  };
  // Not a folder, and a default state folder under a $TMPDIR that is gone (both were internal errors, exit 70).
  const plain = env.file('plain');
  fs.writeFileSync(plain, 'x');
  refused(await up(['--state-dir', path.join(plain, 'sub')]), /^colo: --state-dir .*plain\/sub: cannot use it: ENOTDIR/);
  refused(await up([], [], { TMPDIR: env.file('gone') }), /^colo: a state folder under .*gone: cannot use it: ENOENT/);
  // A disk image an earlier run left (a copy back to --drive that failed names it as the one to keep):
  // the first secondary's empty image would have replaced it.
  const image = env.image('kv.img', 1 << 20);
  const earlier = env.file('earlier');
  fs.mkdirSync(earlier);
  fs.writeFileSync(path.join(earlier, 'vm2.img'), 'the newest disk');
  refused(await up(['--state-dir', earlier], ['--drive', `file=${image}`]), /^colo: --state-dir .*earlier holds the disk image of an earlier colo up \(vm2\.img\): .*move it away first$/);
  assert.equal(fs.readFileSync(path.join(earlier, 'vm2.img'), 'utf8'), 'the newest disk', 'the earlier image is untouched');
  // The --drive itself under such a name, in the state folder.
  const inside = env.file('inside');
  fs.mkdirSync(inside);
  fs.copyFileSync(image, path.join(inside, 'vm2.img'));
  refused(await up(['--state-dir', inside], ['--drive', `file=${path.join(inside, 'vm2.img')}`]), /^colo: --drive .*inside\/vm2\.img is in --state-dir .* rename it$/);
  // Something answers on a child's socket there, with no pid file: not a child this colo up can
  // adopt (one of a colo up that died has its vmN.pid), and its socket must not be taken over.
  const busy = env.file('busy');
  fs.mkdirSync(busy);
  const other = net.createServer((s) => s.destroy());
  await new Promise<void>((resolve) => other.listen(path.join(busy, 'vm1.qmp'), resolve));
  env.onCleanup(() => new Promise<void>((resolve) => other.close(() => resolve())));
  refused(await up(['--state-dir', busy]), /^colo: .*busy: cannot adopt the children of the colo up that ran there: vm1 answers on its QMP socket but its pid file cannot be read \(ENOENT.*\); they are left running$/);
});

test('a drive whose scratch files cannot be made ($TMPDIR gone) is refused in one clear line', async (t) => {
  const env = new TestEnv(t);
  const image = env.image('d.img', 1 << 20);
  for (const extra of [[], ['--snapshot']]) {
    const r = await runProgram(process.execPath, [coloBin, 'run', guests.spin, '--drive', `file=${image}`, ...extra], { timeoutMs: 30000, env: { TMPDIR: env.file('gone') } });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /cannot make the scratch file for drive '.*d\.img' in .*gone \(TMPDIR\): ENOENT/);
    assert.doesNotMatch(r.stderr, /internal error/);
    assert.equal(r.stderr.trim().split('\n').length, 1, `one clear line, got: ${r.stderr}`);
  }
});

test('colo img create: a folder that is not there, or a size the file cannot take, is one clear line and leaves no image', async (t) => {
  const env = new TestEnv(t);
  const r = await colo(['img', 'create', env.file('nodir/x.img'), '1M']);
  // A failure, not a usage error (status 2 before): status 1, as qemu-img's.
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /^colo img: cannot create '.*nodir\/x\.img': ENOENT/);
  assert.doesNotMatch(r.stderr, /internal error/);
  assert.equal(r.stderr.trim().split('\n').length, 1, `one clear line, got: ${r.stderr}`);
  // A file-size limit below the image size: ftruncate fails; no 0-byte image stays behind
  // for a later --if-missing to keep.
  const big = env.file('big.img');
  const u = await runProgram('bash', ['-c', `ulimit -f 100 && exec "${process.execPath}" "${coloBin}" img create "${big}" 64M`], { timeoutMs: 30000 });
  assert.equal(u.code, 1, u.stderr);
  assert.match(u.stderr, /cannot make '.*big\.img' 67108864 bytes long/);
  assert.ok(!fs.existsSync(big), 'no image of the wrong size is left');
  // A symbolic link to nothing is something that exists: refused, or kept with --if-missing.
  const dangling = env.file('dangling.img');
  fs.symlinkSync(env.file('nowhere'), dangling);
  const d = await colo(['img', 'create', dangling, '1M']);
  assert.match(d.stderr, /exists \(use --if-missing/);
  assert.equal((await colo(['img', 'create', '--if-missing', dangling, '1M'])).code, 0);
});

test('colo migrate with a --target-qmp that cannot be reached says so and exits, leaving the source as it was', async (t) => {
  const env = new TestEnv(t);
  const vm = await env.startVm({ name: 'src', guest: guests.spin, args: ['--memory', '16M'] });
  const r = await runProgram(process.execPath, [coloBin, 'migrate', `unix:${vm.qmpPath}`, 'tcp:127.0.0.1:1', '--target-qmp', `unix:${env.file('none.qmp')}`], { timeoutMs: 20000 });
  assert.notEqual(r.code, 0, `exited with ${r.code}`);
  assert.match(r.stderr, /cannot connect to unix:.*none\.qmp/);
  assert.equal(await vm.status(), 'running');
  assert.equal(await vm.migrationStatus(), 'none');
});

test('bad options get one clear line and a non-zero exit', async () => {
  const cases: [string[], RegExp][] = [
    [['run', guests.spin, '--memory', 'banana'], /--memory: 'banana' is not a size/],
    [['run', guests.spin, '--serial', 'tcp:x'], /--serial/],
    [['run', guests.spin, '--frobnicate'], /unknown option '--frobnicate'/],
    [['run', guests.spin, '--drive', 'snapshot=on'], /file=PATH/],
    [['run', guests.spin, '--net', 'listen=nowhere'], /bad listen address/],
    [['run', guests.spin, '--incoming', 'ftp:x'], /--incoming/],
    // Refused when parsed, as a usage error (status 2), not after the guest was loaded (status 1).
    [['run', guests.spin, '--qmp', 'tcp:127.0.0.1:99999'], /^colo: --qmp: bad address 'tcp:127\.0\.0\.1:99999': port '99999' is not a number/],
    [['run', guests.spin, '--qmp', `unix:/tmp/${'a'.repeat(120)}`], /^colo: --qmp: .*longer than the 107 a unix socket allows/],
    [['run', guests.spin, '--incoming', 'tcp:127.0.0.1:99999'], /^colo: --incoming: bad address .*port '99999'/],
    // QEMU opens a monitor (a NIC) for each; one of two was silently dropped.
    [['run', guests.spin, '--qmp', 'unix:/tmp/a.qmp', '--qmp', 'unix:/tmp/b.qmp'], /^colo: --qmp: only one QMP monitor is supported/],
    [['run', guests.spin, '--net', 'listen=127.0.0.1:1', '--net', 'listen=127.0.0.1:2'], /^colo: --net: only one NIC is supported/],
    [['run'], /missing the guest module/],
    [['run', '/nonexistent/guest.wasm'], /nonexistent/],
    [['frobnicate'], /unknown command 'frobnicate'/],
    [['up', guests.spin, '--net', 'listen=127.0.0.1:1', '--heartbeat-timeout', '50'], /--heartbeat-timeout: expected 0 \(off\) or at least 200 ms/],
    [['up', guests.spin, '--net', 'listen=127.0.0.1:1', '--heartbeat-timeout', 'soon'], /--heartbeat-timeout: expected an integer/],
    [['up', guests.spin, '--net', 'listen=127.0.0.1:1', '--protect-timeout', '0'], /--protect-timeout: expected an integer between 1 and/],
    // Refused as colo run refuses it, not by both children of a pair that then failed.
    [['up', guests.spin, '--net', 'listen=127.0.0.1:1', '--memory', '8G'], /^colo: --memory: must be between 64K and 4095M/],
  ];
  for (const [args, re] of cases) {
    const r = await colo(args);
    assert.notEqual(r.code, 0, `colo ${args.join(' ')} exited 0`);
    assert.match(r.stderr, re, `colo ${args.join(' ')}`);
    assert.equal(r.stderr.trim().split('\n').length, 1, `colo ${args.join(' ')} printed more than one line: ${r.stderr}`);
  }
});

test("--help on every command prints that command's options to stdout and exits 0; colo help COMMAND the same", async () => {
  const commands: [string, RegExp][] = [
    ['run', /--incoming defer\|tcp:HOST:PORT\|file:PATH/],
    ['migrate', /--parallel-connections N/],
    ['up', /--checkpoint-delay MS/],
    ['qmp', /COMMAND \[key=value \.\.\.\]/],
    ['img', /--if-missing/],
  ];
  for (const [cmd, re] of commands) {
    // Before, after and among other options; --help wins over a missing or bad argument.
    for (const args of [[cmd, '--help'], [cmd, '-h'], [cmd, guests.spin, '--frobnicate', '--help'], ['help', cmd]]) {
      const r = await colo(args);
      assert.equal(r.code, 0, `colo ${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stdout, new RegExp(`^usage: colo ${cmd} `), `colo ${args.join(' ')}`);
      assert.match(r.stdout, re, `colo ${args.join(' ')}`);
      assert.equal(r.stderr, '', `colo ${args.join(' ')}`);
    }
  }
  for (const args of [['--help'], ['-h'], ['help'], ['help', 'help'], ['help', '--help']]) {
    const all = await colo(args);
    assert.equal(all.code, 0, `colo ${args.join(' ')}`);
    for (const [cmd] of commands) assert.match(all.stdout, new RegExp(`\n  colo ${cmd} `), `colo ${args.join(' ')} names ${cmd}`);
  }
  const none = await colo(['help', 'frobnicate']);
  assert.equal(none.code, 2);
  assert.match(none.stderr, /no command 'frobnicate' \(commands: run, migrate, up, qmp, img\)/);
  // After --, --help is the guest's: colo run goes on and fails on the missing module instead.
  const guestArg = await colo(['run', '/nonexistent/guest.wasm', '--', '--help']);
  assert.notEqual(guestArg.code, 0);
  assert.equal(guestArg.stdout, '');
  assert.match(guestArg.stderr, /nonexistent/);
});

test('corrupted, truncated and foreign state files are refused; nothing runs half-loaded', async (t) => {
  const env = new TestEnv(t);
  const state = env.file('mw.state');
  const src = await env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', '32M'], guestArgs: ['4M'] });
  await src.waitSerial('B');
  await src.qmp.execute('migrate', { uri: `file:${state}` });
  await src.waitMigrationStatus('completed');
  await src.stop();
  const good = fs.readFileSync(state);

  const corrupt = env.file('corrupt.state');
  const c = Buffer.from(good);
  c[Math.floor(c.byteLength / 2)] ^= 0xff;
  fs.writeFileSync(corrupt, c);
  const truncated = env.file('truncated.state');
  fs.writeFileSync(truncated, good.subarray(0, Math.floor(good.byteLength * 0.7)));

  const cases: [string, string, RegExp][] = [
    [guests.memwalk, corrupt, /checksum mismatch|corrupt/],
    [guests.memwalk, truncated, /truncated/],
    [guests.spin, state, /belongs to guest module/],
  ];
  for (const [guest, file, re] of cases) {
    const serial = env.file(`serial-${Math.random()}`);
    const r = await colo(['run', guest, '--memory', '32M', '--serial', `file:${serial}`, '--incoming', `file:${file}`]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, re);
    assert.equal(fs.existsSync(serial) ? fs.readFileSync(serial, 'utf8') : '', '', 'the refused guest printed nothing (never ran)');
  }
  const small = await colo(['run', guests.memwalk, '--memory', '2M', '--incoming', `file:${state}`]);
  assert.notEqual(small.code, 0);
  assert.match(small.stderr, /above this machine's maximum .*--memory/);
});

test('bad QMP input gets QEMU-style errors and the connection stays usable', async (t) => {
  const env = new TestEnv(t);
  const vm = await env.startVm({ name: 'vm', guest: guests.spin });
  const sock = net.connect(vm.qmpPath);
  t.after(() => sock.destroy());
  let buf = '';
  sock.on('data', (d) => (buf += d.toString()));
  const next = async (): Promise<Record<string, unknown>> => {
    const deadline = Date.now() + 5000;
    for (;;) {
      const nl = buf.indexOf('\n');
      if (nl >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const msg = JSON.parse(line) as Record<string, unknown>;
        if (!('event' in msg)) return msg;
        continue;
      }
      if (Date.now() > deadline) throw new Error('timed out waiting for a QMP reply');
      await new Promise((r) => setTimeout(r, 10));
    }
  };
  assert.ok('QMP' in (await next()));
  sock.write('{"execute":"qmp_capabilities"}\n');
  assert.deepEqual(await next(), { return: {} });
  sock.write('{"execute": }\n');
  const bad = (await next()) as { error: { class: string; desc: string } };
  assert.equal(bad.error.class, 'GenericError');
  sock.write('{"execute":"no-such-command","id":7}\n');
  assert.deepEqual(await next(), { error: { class: 'CommandNotFound', desc: 'The command no-such-command has not been found' }, id: 7 });
  sock.write('{"execute":"pmemsave","arguments":{"val":0}}\n');
  const missing = (await next()) as { error: { desc: string } };
  assert.match(missing.error.desc, /Parameter 'size' is missing/);
  sock.write('{"execute":"query-status","id":"x"}\n');
  const st = (await next()) as { return: { status: string }; id: string };
  assert.equal(st.id, 'x');
  assert.equal(st.return.status, 'running');
});

test('colo run on a service address that is in use: a typed, clear error at once, not after the retry that waits for a migration source', async (t) => {
  const env = new TestEnv(t);
  const taken = net.createServer();
  await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
  env.onCleanup(() => new Promise<void>((resolve) => taken.close(() => resolve())));
  const port = (taken.address() as net.AddressInfo).port;
  const t0 = Date.now();
  const r = await colo(['run', guests.kv, '--net', `listen=127.0.0.1:${port}`, '--serial', 'none']);
  const ms = Date.now() - t0;
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port}: .*EADDRINUSE`));
  assert.equal(r.stderr.trim().split('\n').length, 1, `one clear line, got: ${r.stderr}`);
  // Nobody hands a booting VM its address: the 5 s retry for a previous owner is not for it.
  assert.ok(ms < 4000, `refused after ${ms} ms`);
});
