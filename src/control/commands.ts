import { QmpCommandError } from '../core/errors.js';
import { capabilityNames, parameterSchema } from '../migration/params.js';
import type { QmpServer } from './qmp-server.js';
import type { Vm } from './vm.js';

/**
 * The QMP command table of a `colo run` process. Names, arguments and replies follow QEMU
 * where QEMU has the command; handlers stay thin and call the Vm.
 */
export function registerCommands(qmp: QmpServer, vm: Vm): void {
  qmp.register({
    name: 'query-status',
    handler: () => ({ running: vm.machine.running && vm.runState !== 'io-error', singlestep: false, status: vm.runState }),
  });
  qmp.register({ name: 'stop', handler: async () => vm.stop() });
  qmp.register({ name: 'cont', handler: async () => vm.cont() });
  qmp.register({
    name: 'quit',
    handler: () => {
      // As QEMU: the reply, then SHUTDOWN (host-qmp-quit), then the process ends.
      setImmediate(() => vm.quit(0, { guest: false, reason: 'host-qmp-quit' }));
      return {};
    },
  });
  qmp.register({
    name: 'pmemsave',
    args: { val: 'uint', size: 'uint', filename: 'str' },
    handler: async ({ val, size, filename }) => vm.pmemsave(val, size, filename),
  });
  // QEMU's memsave saves what a vCPU sees at virtual addresses. A WebAssembly guest has one
  // vCPU and one linear memory, so its virtual addresses are the guest RAM's.
  qmp.register({
    name: 'memsave',
    args: { val: 'uint', size: 'uint', filename: 'str', '*cpu-index': 'int' },
    handler: async (a) => {
      if (a['cpu-index'] !== undefined && a['cpu-index'] !== 0) throw new QmpCommandError('GenericError', "Parameter 'cpu-index' expects a CPU number");
      await vm.pmemsave(a.val, a.size, a.filename);
    },
  });
  qmp.register({
    name: 'query-memory-size-summary',
    handler: () => ({ 'base-memory': vm.machine.ram().byteLength }),
  });
  qmp.register({
    name: 'query-name',
    handler: () => (vm.opts.name === null ? {} : { name: vm.opts.name }),
  });
  registerMigrationCommands(qmp, vm);
  registerColoCommands(qmp, vm);
}

/** COLO's commands (QEMU's x-colo-lost-heartbeat, query-colo-status), on colo/controller.ts. */
function registerColoCommands(qmp: QmpServer, vm: Vm): void {
  qmp.register({ name: 'x-colo-lost-heartbeat', allowOob: true, handler: () => vm.colo.lostHeartbeat() });
  qmp.register({ name: 'query-colo-status', handler: () => vm.colo.query() });
}

/** QEMU's migration commands (qapi/migration.json), on migration-control.ts. */
function registerMigrationCommands(qmp: QmpServer, vm: Vm): void {
  const mc = vm.migration;
  qmp.register({
    name: 'migrate',
    // blk and inc: QEMU's block migration, before 9.1 removed them. Refused with the reason
    // (an argument check's "Parameter 'blk' is unexpected" did not say that the disk moves anyway).
    args: { uri: 'str', '*detach': 'bool', '*resume': 'bool', '*blk': 'bool', '*inc': 'bool' },
    handler: ({ uri, resume, blk, inc }) => {
      if (resume === true) throw new QmpCommandError('GenericError', 'postcopy recovery (resume) is not supported by colo-vm');
      if (blk === true || inc === true) {
        throw new QmpCommandError(
          'GenericError',
          `block migration (${blk === true ? 'blk' : 'inc'}) is not supported by colo-vm: the disk always travels with the migration, whole or as the snapshot overlay, unless both ends share its image; migrate without it`,
        );
      }
      mc.migrate(uri);
    },
  });
  qmp.register({
    name: 'migrate-incoming',
    args: { uri: 'str', '*exit-on-error': 'bool' },
    handler: async ({ uri, 'exit-on-error': exitOnError }) => mc.migrateIncoming(uri, exitOnError),
  });
  qmp.register({
    name: 'query-migrate',
    handler: () => {
      const info = mc.query();
      const colo = vm.colo.counters();
      return Object.keys(colo).length === 0 ? info : { ...info, 'x-colo': colo };
    },
  });
  qmp.register({
    name: 'migrate-set-capabilities',
    args: { capabilities: [{ struct: { capability: { enum: capabilityNames }, state: 'bool' } }] },
    handler: ({ capabilities }) => mc.setCapabilities(capabilities),
  });
  qmp.register({ name: 'query-migrate-capabilities', handler: () => mc.settings.queryCapabilities() });
  qmp.register({
    name: 'migrate-set-parameters',
    args: parameterSchema,
    handler: (update) => mc.setParameters(update),
  });
  qmp.register({ name: 'query-migrate-parameters', handler: () => mc.settings.queryParameters() });
  for (const name of ['migrate_cancel', 'migrate-cancel']) {
    qmp.register({ name, allowOob: true, handler: () => mc.cancel() });
  }
  qmp.register({
    name: 'yank',
    args: { instances: [{ struct: { type: { enum: ['migration', 'block-node', 'chardev'] }, '*node-name': 'str', '*id': 'str' } }] },
    allowOob: true,
    handler: ({ instances }) => {
      for (const i of instances) {
        if (i.type !== 'migration') throw new QmpCommandError('DeviceNotFound', `Instance '${i.type}' not found`);
      }
      if (instances.length > 0) mc.yank();
    },
  });
  qmp.register({ name: 'query-yank', handler: () => mc.yankInstances() });
}
