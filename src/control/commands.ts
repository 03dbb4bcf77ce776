import { QmpCommandError } from '../core/errors.js';
import type { QmpServer } from './qmp-server.js';
import type { Vm } from './vm.js';

/**
 * The QMP command table of a `colo run` process. Names, arguments and replies follow QEMU
 * where QEMU has the command; handlers stay thin and call the Vm.
 */
export function registerCommands(qmp: QmpServer, vm: Vm): void {
  qmp.register({
    name: 'query-status',
    handler: () => ({ running: vm.machine.running, singlestep: false, status: vm.runState }),
  });
  qmp.register({ name: 'stop', handler: async () => vm.stop() });
  qmp.register({ name: 'cont', handler: async () => vm.cont() });
  qmp.register({
    name: 'quit',
    handler: () => {
      setImmediate(() => vm.quit(0));
      return {};
    },
  });
  qmp.register({
    name: 'pmemsave',
    args: { val: 'uint', size: 'uint', filename: 'str' },
    handler: ({ val, size, filename }) => vm.pmemsave(val, size, filename),
  });
  qmp.register({
    name: 'query-name',
    handler: () => (vm.opts.name === null ? {} : { name: vm.opts.name }),
  });
  qmp.register({
    name: 'migrate',
    args: { uri: 'str', '*detach': 'bool', '*resume': 'bool' },
    handler: ({ uri }) => {
      if (uri.startsWith('file:') && uri.length > 5) return vm.startFileMigration(uri.slice(5));
      throw new QmpCommandError('GenericError', `Invalid migration URI '${uri}' (expected file:PATH or tcp:HOST:PORT)`);
    },
  });
  qmp.register({ name: 'query-migrate', handler: () => vm.queryMigrate() });
}
