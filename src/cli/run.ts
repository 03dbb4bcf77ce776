import { ColoError, errorMessage } from '../core/errors.js';
import { logger, setLogNode } from '../core/log.js';
import { latencyTrace } from '../core/latency-trace.js';
import fs from 'node:fs';
import path from 'node:path';
import { QmpServer } from '../control/qmp-server.js';
import { registerCommands } from '../control/commands.js';
import { Vm } from '../control/vm.js';
import { parseRunArgs } from './options.js';

const log = logger('run');

/** COLO_TRACE_DIR: the trace goes to DIR/trace-PID.json when the process exits. */
function writeLatencyTraceAtExit(): void {
  const dir = process.env.COLO_TRACE_DIR;
  if (latencyTrace === null || dir === undefined) return;
  const trace = latencyTrace;
  process.on('exit', () => {
    try {
      fs.writeFileSync(path.join(dir, `trace-${process.pid}.json`), JSON.stringify(trace.data()));
    } catch (err) {
      process.stderr.write(`colo run: COLO_TRACE_DIR: the latency trace was not written: ${errorMessage(err)}\n`);
    }
  });
}

/** `colo run GUEST.wasm [options]`: one VM in this process, as one qemu-system process. */
export async function runCommand(argv: string[]): Promise<number> {
  const opts = parseRunArgs(argv);
  if (opts.name !== null) setLogNode(opts.name);
  writeLatencyTraceAtExit();
  // Handled from the start: a signal during the start-up (instrumenting a guest not in the
  // cache takes seconds) got the default action, status 130 or 143, no line said why, and one
  // that came while the machine was made left its image's lock entry. Such a signal is taken
  // when the machine is made (not in the middle of a synchronous instrumenting), and ends it
  // before the monitor listens and the guest boots, as a signal afterwards does.
  let vm: Vm | null = null;
  let signalled = false;
  const onSignal = (sig: string): void => {
    log.info(`${sig} received, quitting`);
    signalled = true;
    // QEMU's SHUTDOWN event of a signal (qemu_system_killed): management sees why it went.
    vm?.quit(0, { guest: false, reason: 'host-signal' });
  };
  process.once('SIGINT', () => onSignal('SIGINT'));
  process.once('SIGTERM', () => onSignal('SIGTERM'));
  // As QEMU's (os_setup_signal_handling): the terminal or ssh session that started it closing.
  process.once('SIGHUP', () => onSignal('SIGHUP'));
  try {
    vm = await Vm.create(opts);
  } catch (err) {
    if (err instanceof ColoError) {
      process.stderr.write(`colo run: ${err.message}\n`);
      return 1;
    }
    throw err;
  }
  let qmp: QmpServer | null = null;
  let resolveExit!: (code: number) => void;
  const exited = new Promise<number>((r) => (resolveExit = r));
  const made = vm;
  const shutdown = async (code: number): Promise<void> => {
    await qmp?.close();
    await made.destroy();
    resolveExit(code);
  };
  vm.on('quit', (code: number) => void shutdown(code));
  if (signalled) {
    // The signal came during the start-up: the machine (and its image lock) goes at once.
    vm.quit(0, { guest: false, reason: 'host-signal' });
    return exited;
  }
  try {
    if (opts.qmp !== null) {
      qmp = new QmpServer();
      registerCommands(qmp, vm);
      vm.on('qmp-event', (name: string, data?: Record<string, unknown>) => qmp!.emit(name, data));
      await qmp.listen(opts.qmp);
    }
    await vm.boot();
  } catch (err) {
    // A quit (a signal, QMP quit) during the boot destroys the machine under it: its own
    // shutdown ends the process, with its own status.
    if (vm.exiting) {
      log.debug(`the boot ended by the quit: ${errorMessage(err)}`);
      return exited;
    }
    process.stderr.write(`colo run: ${errorMessage(err)}\n`);
    await shutdown(1);
    return exited;
  }
  return exited;
}
