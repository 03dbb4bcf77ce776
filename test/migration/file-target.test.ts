/**
 * `migrate uri=file:PATH` writes the state to a new file and renames it over PATH. So PATH must
 * be a regular file or new: a device or a FIFO there is refused (renaming over it replaced it,
 * as root even /dev/null), a symbolic link keeps pointing at the state, and an existing file
 * keeps its mode.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { execFileSync } from 'node:child_process';
import { TestEnv, guests, waitFor } from '../framework/harness.js';
import { machineFor } from '../framework/machine.js';
import { ColoError } from '../../src/core/errors.js';
import { loadMachineFromFile, saveMachineToFile } from '../../src/migration/file.js';

test('migrate to file: a FIFO is refused and the VM runs on; a symlink stays a link to the state; a private file stays private', async (t) => {
  const env = new TestEnv(t);
  const vm = await env.startVm({ name: 'src', guest: guests.spin, args: ['--memory', '16M'] });

  const fifo = env.file('state.fifo');
  execFileSync('mkfifo', [fifo]);
  await vm.qmp.execute('migrate', { uri: `file:${fifo}` });
  const failed = await vm.waitMigrationStatus('failed', 10000);
  assert.match(String(failed['error-desc']), /it is not a regular file/);
  assert.ok(fs.statSync(fifo).isFIFO(), 'the FIFO is still a FIFO');
  // The VM is resumed just after the status turns failed (as in QEMU): a CI run under load caught it paused.
  await waitFor('the VM running again after the refused migration', async () => (await vm.status()) === 'running', 5000);

  const real = env.file('real.state');
  fs.writeFileSync(real, 'old', { mode: 0o600 });
  fs.chmodSync(real, 0o600);
  const link = env.file('link.state');
  fs.symlinkSync(real, link);
  await vm.qmp.execute('migrate', { uri: `file:${link}` });
  await vm.waitMigrationStatus('completed', 20000);
  assert.ok(fs.lstatSync(link).isSymbolicLink(), 'the link is still a link');
  assert.ok(fs.statSync(real).size > 1000, 'the state is in the file the link names');
  assert.equal(fs.statSync(real).mode & 0o777, 0o600, 'the replaced file kept its mode');
  assert.deepEqual(vm.errorLines().filter((l) => !/migration failed/.test(l)), []);

  // The state restores.
  const restored = await env.startVm({ name: 'dst', guest: guests.spin, args: ['--memory', '16M', '--incoming', `file:${link}`] });
  assert.equal(await restored.status(), 'running');
});

test('--incoming file: a directory, a truncated state and another guest\'s state are refused with a typed error naming the file', async (t) => {
  const env = new TestEnv(t);
  const { m: src } = await machineFor(t, guests.spin, []);
  const state = env.file('spin.state');
  saveMachineToFile(src, await src.saveVcpu(), state);
  const refusal = async (guest: string, file: string): Promise<ColoError> => {
    const { m } = await machineFor(t, guest, []);
    const err = await loadMachineFromFile(m, file).then(() => null, (e: unknown) => e);
    assert.ok(err instanceof ColoError, `a typed error for ${file}: ${String(err)}`);
    return err;
  };
  const dir = await refusal(guests.spin, env.dir);
  assert.equal(dir.code, 'FILE_READ');
  assert.match(dir.message, new RegExp(`cannot read '${env.dir}': EISDIR`));
  const cut = env.file('cut.state');
  fs.writeFileSync(cut, fs.readFileSync(state).subarray(0, 4000));
  const truncated = await refusal(guests.spin, cut);
  assert.equal(truncated.code, 'STREAM_TRUNCATED');
  assert.match(truncated.message, /cut\.state' is truncated/);
  assert.equal((await refusal(guests.memwalk, state)).code, 'STATE_WRONG_MODULE');
});
