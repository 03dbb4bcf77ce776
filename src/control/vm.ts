import fs from 'node:fs';
import { EventEmitter } from 'node:events';
import { ColoError, MigrationError, QmpCommandError, UsageError, errorMessage } from '../core/errors.js';
import { logger } from '../core/log.js';
import { limits } from '../core/limits.js';
import { loadGuest } from '../machine/instrument.js';
import { Machine, type RunState } from '../machine/machine.js';
import { FrontEnd } from '../net/frontend.js';
import type { NicOutput } from '../net/nic.js';
import type { RunOptions } from '../cli/options.js';
import { loadMachineFromFile, saveMachineToFile } from '../migration/file.js';

const log = logger('vm');

/** QEMU's MigrationStatus values that colo-vm uses. */
export type MigrationStatus =
  | 'none'
  | 'setup'
  | 'cancelling'
  | 'cancelled'
  | 'active'
  | 'postcopy-active'
  | 'device'
  | 'completed'
  | 'failed'
  | 'colo'
  | 'pre-switchover';

export interface MigrationInfo {
  status: MigrationStatus;
  startTimeMs: number;
  endTimeMs: number | null;
  setupTimeMs: number;
  downtimeMs: number | null;
  transferredBytes: number;
  totalBytes: number;
  normalPages: number;
  zeroPages: number;
  errorDesc: string | null;
}

/**
 * One VM process: the machine, its network front end, and the state QMP reports. Emits
 * 'qmp-event' (name, data) for every QMP event and 'quit' when the process should exit.
 */
export class Vm extends EventEmitter {
  frontEnd: FrontEnd | null = null;
  migration: MigrationInfo | null = null;
  private quitting = false;

  private constructor(readonly opts: RunOptions, readonly machine: Machine) {
    super();
    machine.on('stop', () => this.event('STOP'));
    machine.on('resume', () => this.event('RESUME'));
    machine.on('output', (out: NicOutput) => this.frontEnd?.deliver(out));
    machine.on('shutdown', (code: number) => {
      log.info(`guest exited with code ${code}`);
      this.event('SHUTDOWN', { guest: true, reason: 'guest-shutdown' });
      this.quit(code);
    });
    machine.on('panicked', (message: string) => {
      log.error(`guest crashed: ${message}`);
      this.event('GUEST_PANICKED', { action: 'pause', info: { type: 'wasm-trap', message } });
    });
  }

  static async create(opts: RunOptions): Promise<Vm> {
    const guest = await loadGuest(opts.guestPath, { storeLog: opts.storeLog ?? false });
    const machine = await Machine.create({
      guest,
      memoryBytesMax: opts.memoryBytes,
      args: [opts.name ?? opts.guestPath.replace(/^.*\//, '').replace(/\.wasm$/, ''), ...opts.guestArgs],
      env: [],
      serial: opts.serial,
      drive: opts.drive,
    });
    return new Vm(opts, machine);
  }

  get runState(): RunState {
    return this.machine.runState;
  }

  event(name: string, data?: Record<string, unknown>): void {
    this.emit('qmp-event', name, data);
  }

  /** Boot: restore from a file if asked, bring the NIC up, run unless -S. */
  async boot(): Promise<void> {
    const inc = this.opts.incoming;
    if (inc !== null && inc.startsWith('file:')) {
      this.machine.setRunState('inmigrate');
      await loadMachineFromFile(this.machine, inc.slice(5));
      log.info(`machine restored from ${inc.slice(5)}`);
      this.machine.setRunState('paused');
    } else if (inc !== null) {
      // Live migration over TCP is issue 3's engine; until it lands this is a clear refusal
      // rather than a VM that waits forever.
      throw new UsageError('INCOMING_UNSUPPORTED', `--incoming ${inc}: only file:PATH is supported by this build`);
    }
    if (inc === null || inc.startsWith('file:')) {
      await this.startFrontEnd();
      if (!this.opts.startPaused) await this.machine.cont();
    }
  }

  /** Listen on the --net address and attach it to the guest NIC. */
  async startFrontEnd(): Promise<void> {
    if (this.opts.net === null || this.frontEnd !== null) return;
    const state = await this.machine.saveVcpu();
    const fe = new FrontEnd(this.opts.net, (ev) => this.machine.injectInput(ev), { seq: state.nic.lastSeq, conn: maxConn(state) });
    // Connections the guest knows belong to a front end that no longer exists: the guest
    // sees them reset.
    for (const c of state.nic.conns) fe.resetGuestConnection(c.conn);
    for (const ev of state.nic.pending) if (ev.kind === 'open') fe.resetGuestConnection(ev.conn);
    await listenWithRetry(fe);
    this.frontEnd = fe;
    log.info(`serving guest NIC on ${this.opts.net.host}:${fe.boundPort()}`);
  }

  async stop(): Promise<void> {
    await this.machine.pause('paused');
  }

  async cont(): Promise<void> {
    const s = this.machine.runState;
    if (s === 'inmigrate') throw new QmpCommandError('GenericError', 'Migration is not finalized yet');
    if (s === 'postmigrate' || s === 'shutdown' || s === 'guest-panicked' || s === 'internal-error') {
      throw new QmpCommandError('GenericError', `the VM cannot run in state ${s}`);
    }
    if (this.migration !== null && (this.migration.status === 'active' || this.migration.status === 'setup' || this.migration.status === 'device')) {
      throw new QmpCommandError('GenericError', 'a migration is in progress');
    }
    await this.machine.cont();
  }

  /** Guest memory [addr, addr+size) into a file (QMP pmemsave). */
  pmemsave(addr: number, size: number, filename: string): void {
    const ram = this.machine.ram();
    if (addr < 0 || size < 0 || addr + size > ram.byteLength) {
      throw new QmpCommandError('GenericError', `Invalid addr 0x${addr.toString(16)}/size ${size} specified (guest RAM is ${ram.byteLength} bytes)`);
    }
    try {
      fs.writeFileSync(filename, ram.slice(addr, addr + size));
    } catch (err) {
      throw new QmpCommandError('GenericError', `writing to file '${filename}' failed: ${errorMessage(err)}`);
    }
  }

  private setMigrationStatus(status: MigrationStatus): void {
    if (this.migration === null) return;
    this.migration.status = status;
    this.event('MIGRATION', { status });
  }

  /** migrate uri=file:PATH — the whole machine into a file; the VM ends in postmigrate. */
  startFileMigration(path: string): void {
    if (this.migration !== null && ['setup', 'active', 'device', 'cancelling', 'colo'].includes(this.migration.status)) {
      throw new QmpCommandError('GenericError', 'There is a migration process in progress');
    }
    const s = this.machine.runState;
    if (s === 'inmigrate' || s === 'postmigrate' || s === 'shutdown' || s === 'guest-panicked') {
      throw new QmpCommandError('GenericError', `cannot migrate a VM in state ${s}`);
    }
    const start = Date.now();
    this.migration = {
      status: 'none', startTimeMs: start, endTimeMs: null, setupTimeMs: 0, downtimeMs: null,
      transferredBytes: 0, totalBytes: this.machine.ram().byteLength, normalPages: 0, zeroPages: 0, errorDesc: null,
    };
    this.setMigrationStatus('setup');
    void this.runFileMigration(path, start);
  }

  private async runFileMigration(path: string, start: number): Promise<void> {
    const info = this.migration!;
    const wasRunning = this.machine.running;
    try {
      info.setupTimeMs = Date.now() - start;
      this.setMigrationStatus('active');
      await this.machine.pause('finish-migrate');
      const stoppedAt = Date.now();
      this.setMigrationStatus('device');
      const vcpu = await this.machine.saveVcpu();
      const stats = saveMachineToFile(this.machine, vcpu, path);
      info.transferredBytes = stats.bytes;
      info.normalPages = stats.normalPages;
      info.zeroPages = stats.zeroPages;
      info.downtimeMs = Date.now() - stoppedAt;
      info.endTimeMs = Date.now();
      this.machine.setRunState('postmigrate');
      this.setMigrationStatus('completed');
      log.info(`machine saved to ${path} (${stats.bytes} bytes, ${stats.normalPages} pages, ${stats.zeroPages} zero pages)`);
    } catch (err) {
      info.errorDesc = errorMessage(err);
      info.endTimeMs = Date.now();
      log.warn(`migration to ${path} failed: ${info.errorDesc}`);
      this.setMigrationStatus('failed');
      if (this.machine.runState === 'finish-migrate') this.machine.setRunState('paused');
      if (wasRunning) {
        try {
          await this.machine.cont();
        } catch (e) {
          log.error(`could not resume the VM after a failed migration: ${errorMessage(e)}`);
        }
      }
    }
  }

  queryMigrate(): Record<string, unknown> {
    const m = this.migration;
    if (m === null) return {};
    const out: Record<string, unknown> = { status: m.status };
    if (m.status === 'failed' && m.errorDesc !== null) out['error-desc'] = m.errorDesc;
    const end = m.endTimeMs ?? Date.now();
    out['total-time'] = end - m.startTimeMs;
    out['setup-time'] = m.setupTimeMs;
    if (m.downtimeMs !== null) out.downtime = m.downtimeMs;
    const seconds = Math.max(0.001, (end - m.startTimeMs) / 1000);
    out.ram = {
      transferred: m.transferredBytes,
      total: m.totalBytes,
      remaining: m.status === 'completed' ? 0 : m.totalBytes,
      duplicate: m.zeroPages,
      normal: m.normalPages,
      'normal-bytes': m.normalPages * limits.pageBytes,
      'dirty-sync-count': 1,
      mbps: (m.transferredBytes * 8) / 1e6 / seconds,
      'dirty-pages-rate': 0,
      'page-size': limits.pageBytes,
    };
    return out;
  }

  quit(code = 0): void {
    if (this.quitting) return;
    this.quitting = true;
    this.emit('quit', code);
  }

  async destroy(): Promise<void> {
    await this.frontEnd?.close();
    this.frontEnd = null;
    await this.machine.destroy();
  }
}

function maxConn(state: Awaited<ReturnType<Machine['saveVcpu']>>): number {
  let m = 0;
  for (const c of state.nic.conns) m = Math.max(m, c.conn);
  for (const e of state.nic.pending) m = Math.max(m, e.conn);
  return m;
}

/** The previous owner of the address (a migration source) may still be closing it. */
async function listenWithRetry(fe: FrontEnd): Promise<void> {
  const deadline = Date.now() + 5000;
  for (;;) {
    try {
      await fe.listen();
      return;
    } catch (err) {
      if (Date.now() > deadline || !(err instanceof ColoError) || !/EADDRINUSE/.test(err.message)) throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

export { MigrationError };
