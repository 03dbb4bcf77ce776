/**
 * The serial console's fd is non-blocking (--serial file:FIFO, and --serial stdio on a
 * terminal), so a console nobody reads fills and the guest waits in its write (Serial.write's
 * wait for a full console) where a pause gets through. Before, the vCPU blocked in write(2)
 * and `stop` timed out; a FIFO with no reader at all blocked the whole process in its open.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { execFileSync, spawn } from 'node:child_process';
import { TestEnv, coloBin, connectQmpWhenUp, sleep, waitFor, withTimeout } from '../framework/harness.js';
import { watGuest } from '../framework/machine.js';

/** Writes 4 KiB of 'A' to stdout in a loop. */
const consoleGuest = `(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (memory.fill (i32.const 4096) (i32.const 65) (i32.const 4096))
    (i32.store (i32.const 0) (i32.const 4096)) (i32.store (i32.const 4) (i32.const 4096))
    (loop $l (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16))) (br $l))))`;

/** Reads what is in the FIFO now (a non-blocking fd); '' when it is empty. */
function drain(fd: number): string {
  const buf = Buffer.alloc(65536);
  let out = '';
  for (;;) {
    let n: number;
    try {
      n = fs.readSync(fd, buf, 0, buf.byteLength, null);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EAGAIN') return out;
      throw err;
    }
    if (n === 0) return out;
    out += buf.toString('latin1', 0, n);
  }
}

async function stopQuickly(vm: { qmp: { execute(cmd: string): Promise<unknown> }; status(): Promise<string> }): Promise<void> {
  const t0 = performance.now();
  await withTimeout(vm.qmp.execute('stop'), 10000, 'the reply to stop');
  const ms = performance.now() - t0;
  assert.ok(ms < 1000, `stop took ${ms.toFixed(0)} ms`);
  assert.equal(await vm.status(), 'paused');
}

for (const reader of ['a reader that never reads', 'no reader at all'] as const) {
  test(`--serial file:FIFO with ${reader}: the guest waits in its console write, stop pauses it at once, and a reader then gets the output whole`, async (t) => {
    const env = new TestEnv(t);
    const guest = watGuest(t, 'console', consoleGuest);
    const fifo = env.file('console.fifo');
    execFileSync('mkfifo', [fifo]);
    let readFd: number | null = null;
    env.onCleanup(() => {
      if (readFd !== null) fs.closeSync(readFd);
    });
    if (reader === 'a reader that never reads') readFd = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    // The later --serial wins over the harness's own.
    const vm = await env.startVm({ name: 'vm', guest, args: ['--serial', `file:${fifo}`] });
    // The pipe fills (64 KiB), and stays full: the guest waits in fd_write.
    await sleep(500);
    assert.equal(await vm.status(), 'running');
    await stopQuickly(vm);
    await vm.qmp.execute('cont');
    await sleep(200);
    await stopQuickly(vm);
    await vm.qmp.execute('cont');
    readFd ??= fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    const fd = readFd;
    let got = '';
    await waitFor('1 MiB of console output once the FIFO is read', () => {
      got += drain(fd);
      return got.length > 1024 * 1024;
    }, 20000);
    assert.match(got, /^A+$/, 'the output holds only the bytes the guest wrote');
    assert.equal(vm.alive, true);
  });
}

test('--serial stdio on a terminal nobody reads (Node leaves a TTY stdout blocking): stop pauses the guest at once, and the output goes on after', async (t) => {
  const env = new TestEnv(t);
  const guest = watGuest(t, 'console', consoleGuest);
  const qmpPath = env.file('vm.qmp');
  // script(1) runs colo on a pseudo-terminal and copies it to its stdout: once the test stops
  // reading that, script stops reading the terminal, whose buffer fills.
  const cmd = [process.execPath, coloBin, 'run', guest, '--name', 'vm', '--serial', 'stdio', '--qmp', `unix:${qmpPath}`].map((a) => `'${a}'`).join(' ');
  const child = spawn('script', ['-qfec', cmd, '/dev/null'], { cwd: env.dir, stdio: ['pipe', 'pipe', 'pipe'] });
  let out = 0;
  let tail = '';
  child.stdout!.on('data', (d: Buffer) => {
    out += d.byteLength;
    tail = (tail + d.toString('latin1')).slice(-64);
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  env.onCleanup(async () => {
    child.kill('SIGKILL');
    await withTimeout(exited, 10000, 'script to exit after SIGKILL');
  });
  const qmp = await connectQmpWhenUp(qmpPath, 'vm', () => (child.exitCode === null ? null : `script exited with code ${child.exitCode}`));
  env.onCleanup(async () => {
    await qmp.execute('quit').catch(() => undefined);
    qmp.close();
  });
  const status = async (): Promise<string> => ((await qmp.execute('query-status')) as { status: string }).status;
  await waitFor('the guest to write to the terminal', () => out > 0, 10000);
  child.stdout!.pause();
  // script's pipe, then the terminal fill, and stay full: the guest waits in fd_write.
  await sleep(1000);
  assert.equal(await status(), 'running');
  await stopQuickly({ qmp, status });
  await qmp.execute('cont');
  const before = out;
  child.stdout!.resume();
  await waitFor('more output once the terminal is read', () => out > before + 1024 * 1024, 20000);
  assert.match(tail, /^A+$/, 'the terminal shows the bytes the guest wrote');
});

test('--serial file: on a full filesystem: the guest runs on, and one warning says its console output is dropped, once per streak of failed writes', async (t) => {
  const env = new TestEnv(t);
  const guest = watGuest(t, 'console', consoleGuest);
  const mnt = await env.tmpfs('small', '256k');
  const file = `${mnt}/console`;
  const vm = await env.startVm({ name: 'vm', guest, args: ['--serial', `file:${file}`] });
  const warnings = (): string[] => vm.stderr.split('\n').filter((l) => / warn machine: writes to the serial console \(file:.*\) fail: .*dropped/.test(l));
  await waitFor('a warning that the serial console writes fail', () => warnings().length > 0, 10000);
  // The guest goes on writing into the full filesystem: no warning per write.
  await sleep(500);
  assert.equal(warnings().length, 1, `one warning for the streak: ${warnings().join('\n')}`);
  assert.equal(await vm.status(), 'running');
  // Room again: the writes work (said once), then fill it again: a new streak, a new warning.
  fs.truncateSync(file, 0);
  await waitFor('a line that the serial console writes work again', () => / info machine: writes to the serial console \(file:.*\) work again; \d+ bytes/.test(vm.stderr), 10000);
  await waitFor('a second warning once the filesystem is full again', () => warnings().length === 2, 10000);
  await sleep(300);
  assert.equal(warnings().length, 2);
  assert.equal(await vm.status(), 'running');
  assert.equal(vm.alive, true);
});
