/** The test harness itself: what a test leaves behind is cleaned up. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { TestEnv, pidAlive, waitFor } from './harness.js';

test('TestEnv kills a process the test left running with a socket in its folder (a colo up child whose parent was killed), and removes the folder', async (t) => {
  let dir = '';
  let pid = 0;
  await t.test('a test that leaves a process behind', async (tt) => {
    const env = new TestEnv(tt);
    dir = env.dir;
    // As a `colo run` child of a `colo up` that runProgram's timeout killed: not a VM of the
    // harness, nobody's cleanup; its command line names its QMP socket in the test folder.
    const child = spawn(process.execPath, ['-e', 'setInterval(() => undefined, 1000)', '--', '--qmp', `unix:${env.file('orphan.qmp')}`], { stdio: 'ignore' });
    t.after(() => child.kill('SIGKILL'));
    pid = child.pid!;
    assert.ok(pidAlive(pid));
  });
  await waitFor(`process ${pid}, left running by the test, to be gone`, () => !pidAlive(pid), 5000);
  assert.equal(fs.existsSync(dir), false, 'the test folder is removed');
});
