/** Small helpers of the benchmarks: `colo run` processes with QMP, tables, statistics. */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { QmpClient } from '../src/control/qmp-client.js';
import { connectQmpWhenUp, waitFor } from '../test/framework/harness.js';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const coloBin = path.join(root, 'dist/src/cli/main.js');

export { waitFor };

/** `argv` run through taskset on the CPU list `cpus` (e.g. "0"), or as it is without one. */
export function pinnedArgv(argv: string[], cpus: string | undefined): string[] {
  return cpus === undefined ? argv : ['taskset', '-c', cpus, ...argv];
}

export class BenchVm {
  stderr = '';
  exited = false;
  private constructor(readonly name: string, readonly child: ChildProcess, readonly qmp: QmpClient, readonly serialPath: string) {}

  /** `cpus`: a CPU list for taskset (e.g. "0"): the process and all its threads run only there. */
  /**
   * `how.bin`: another program that takes `colo run`'s argv (bench/lockstep-vm.ts), with
   * `how.env` added to the environment.
   */
  static async start(dir: string, name: string, guest: string, args: string[], guestArgs: string[], cpus?: string, how: { bin?: string; env?: Record<string, string> } = {}): Promise<BenchVm> {
    const qmpPath = path.join(dir, `${name}.qmp`);
    const serialPath = path.join(dir, `${name}.serial`);
    fs.rmSync(serialPath, { force: true });
    const argv = [process.execPath, how.bin ?? coloBin, 'run', guest, '--name', name, '--serial', `file:${serialPath}`, '--qmp', `unix:${qmpPath}`, ...args, '--', ...guestArgs];
    const [cmd, ...rest] = pinnedArgv(argv, cpus);
    const child = spawn(cmd!, rest, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...how.env } });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    let exited = false;
    child.once('exit', () => (exited = true));
    const qmp = await connectQmpWhenUp(qmpPath, name, () => (exited ? `exited: ${stderr}` : null));
    const vm = new BenchVm(name, child, qmp, serialPath);
    child.stderr!.on('data', (d: Buffer) => (vm.stderr += d.toString()));
    child.once('exit', () => (vm.exited = true));
    return vm;
  }

  serial(): string {
    try {
      return fs.readFileSync(this.serialPath, 'latin1');
    } catch {
      return '';
    }
  }

  async waitSerial(marker: string, timeoutMs = 120000): Promise<void> {
    await waitFor(`'${marker}' on ${this.name}'s serial`, () => {
      if (this.exited) throw new Error(`${this.name} exited: ${this.stderr}`);
      return this.serial().includes(marker);
    }, timeoutMs, 50);
  }

  async migrationInfo(): Promise<Record<string, unknown>> {
    return this.qmp.execute<Record<string, unknown>>('query-migrate');
  }

  async waitStatus(want: string, timeoutMs = 120000): Promise<Record<string, unknown>> {
    return waitFor(`migration status ${want} on ${this.name}`, async () => {
      const r = await this.migrationInfo();
      if (r.status === want) return r;
      if (r.status === 'failed' || r.status === 'cancelled') throw new Error(`${this.name}: migration ${String(r.status)}: ${String(r['error-desc'])}`);
      return undefined;
    }, timeoutMs, 10);
  }

  async setMigration(capabilities: Record<string, boolean>, parameters: Record<string, number>): Promise<void> {
    await this.qmp.execute('migrate-set-capabilities', { capabilities: Object.entries(capabilities).map(([capability, state]) => ({ capability, state })) });
    if (Object.keys(parameters).length > 0) await this.qmp.execute('migrate-set-parameters', parameters);
  }

  async stop(): Promise<void> {
    if (!this.exited) {
      try {
        await this.qmp.execute('quit', {}, { timeoutMs: 2000 });
      } catch {
        // fall through
      }
    }
    await this.qmp.close().catch(() => undefined);
    await waitFor(`${this.name} to exit`, () => this.exited, 5000).catch(() => this.child.kill('SIGKILL'));
  }
}

export function tempDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'colo-bench-'));
}

export function table(rows: (string | number)[][]): void {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => String(r[i]).length)));
  for (const [n, r] of rows.entries()) {
    process.stdout.write('| ' + r.map((c, i) => String(c).padEnd(widths[i]!)).join(' | ') + ' |\n');
    if (n === 0) process.stdout.write('|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|\n');
  }
  process.stdout.write('\n');
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export function quantile(xs: number[], q: number): number {
  return quantileOfSorted([...xs].sort((a, b) => a - b), q);
}

/** quantile() of values already in ascending order (no copy, no sort). */
export function quantileOfSorted(s: readonly number[], q: number): number {
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
}
