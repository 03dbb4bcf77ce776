import assert from 'node:assert/strict';
import { TestEnv, guests, memwalkRegion, waitFor, type VmProcess } from '../framework/harness.js';

export interface PairOptions {
  /** memwalk region (guest argument), default 32M. */
  region?: string;
  memory?: string;
  /** Capabilities and parameters set on both ends. */
  capabilities?: Record<string, boolean>;
  parameters?: Record<string, number>;
  srcArgs?: string[];
  dstArgs?: string[];
}

/**
 * A running memwalk source and a `--incoming defer` destination listening on an ephemeral
 * port (reported by query-migrate's socket-address).
 */
export async function memwalkPair(env: TestEnv, o: PairOptions = {}): Promise<{ src: VmProcess; dst: VmProcess; port: number; region: { start: number; size: number } }> {
  const memory = o.memory ?? '96M';
  const guestArgs = [o.region ?? '32M'];
  const [src, dst] = await Promise.all([
    env.startVm({ name: 'src', guest: guests.memwalk, args: ['--memory', memory, ...(o.srcArgs ?? [])], guestArgs }),
    env.startVm({ name: 'dst', guest: guests.memwalk, args: ['--memory', memory, '--incoming', 'defer', ...(o.dstArgs ?? [])], guestArgs }),
  ]);
  await Promise.all([src.setMigration(o.capabilities ?? {}, o.parameters ?? {}), dst.setMigration(o.capabilities ?? {}, o.parameters ?? {})]);
  await src.waitSerial('B', { count: 5 });
  const region = memwalkRegion(src.serial());
  assert.ok(region, 'memwalk printed its region');
  const port = await dst.listenIncoming();
  return { src, dst, port, region };
}

/** The MIGRATION statuses a VM reported since event index `after`. */
/**
 * `migrate` from src to 127.0.0.1:port, resolved once the source's migration is active. The
 * event counts before it (`dst`'s too, if given) are for waits and checks after.
 */
export async function migrateUntilActive(src: VmProcess, port: number, dst?: VmProcess): Promise<{ mark: number; dstMark: number }> {
  const mark = src.qmp.eventCount;
  const dstMark = dst?.qmp.eventCount ?? 0;
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  await src.waitEvent('MIGRATION', { after: mark, where: (e) => e.data.status === 'active' });
  return { mark, dstMark };
}

export function statuses(vm: VmProcess, after = 0): string[] {
  return vm.eventsOf('MIGRATION', after).map((e) => String(e.data.status));
}

/** The guest keeps running: its memwalk pass count grows by `passes`. */
export async function assertAdvancing(vm: VmProcess, passes = 3, timeoutMs = 15000): Promise<void> {
  const before = vm.passes();
  await waitFor(`${vm.spec.name}'s memwalk to finish ${passes} more passes`, () => vm.passes() >= before + passes, timeoutMs);
}

/** The guest does not run: no serial output for `ms`. */
export async function assertStill(vm: VmProcess, ms = 300): Promise<void> {
  const before = vm.serial().length;
  await new Promise((r) => setTimeout(r, ms));
  assert.equal(vm.serial().length, before, `${vm.spec.name}'s guest wrote to its serial console while it should be paused`);
}

/** No error-level log line (a passing run logs none). */
export function assertNoErrors(...vms: VmProcess[]): void {
  for (const vm of vms) assert.deepEqual(vm.errorLines(), [], `${vm.spec.name} logged errors:\n${vm.stderr}`);
}
