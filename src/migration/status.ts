import { limits } from '../core/limits.js';

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

/** Statuses in which a migration is under way (a second one is refused, settings are locked). */
export const busyStatuses: readonly MigrationStatus[] = ['setup', 'active', 'device', 'cancelling', 'colo', 'pre-switchover'];

/**
 * What query-migrate reports. One object per migration, written by the source or destination
 * core (pure data, so the cores' tests can look at it).
 */
export interface MigrationStats {
  status: MigrationStatus;
  startTimeMs: number;
  endTimeMs: number | null;
  setupTimeMs: number;
  downtimeMs: number | null;
  expectedDowntimeMs: number | null;
  transferredBytes: number;
  /** Of transferredBytes, those the multifd channels carried (QEMU's multifd-bytes). */
  multifdBytes: number;
  /** Of transferredBytes, those sent while the VM was stopped for the switchover (downtime-bytes). */
  downtimeBytes: number;
  /** Pages sent per second in the last round that measured the link (pages-per-second). */
  pagesPerSecond: number;
  totalBytes: number;
  remainingBytes: number;
  normalPages: number;
  zeroPages: number;
  diskBlocks: number;
  dirtySyncCount: number;
  /** Bytes per ms of the last round that moved enough data to measure (0 before the first). */
  bandwidthBytesPerMs: number;
  dirtyPagesRate: number;
  errorDesc: string | null;
  /** Destination: the addresses it listens on (QEMU's socket-address). */
  socketAddress: { host: string; port: number }[] | null;
}

export function newStats(startTimeMs: number, totalBytes: number): MigrationStats {
  return {
    status: 'none',
    startTimeMs,
    endTimeMs: null,
    setupTimeMs: 0,
    downtimeMs: null,
    expectedDowntimeMs: null,
    transferredBytes: 0,
    multifdBytes: 0,
    downtimeBytes: 0,
    pagesPerSecond: 0,
    totalBytes,
    remainingBytes: totalBytes,
    normalPages: 0,
    zeroPages: 0,
    diskBlocks: 0,
    dirtySyncCount: 0,
    bandwidthBytesPerMs: 0,
    dirtyPagesRate: 0,
    errorDesc: null,
    socketAddress: null,
  };
}

/** query-migrate's reply (MigrationInfo), in QEMU's member names. */
export function migrationInfo(m: MigrationStats, nowMs: number): Record<string, unknown> {
  const out: Record<string, unknown> = { status: m.status };
  if (m.status === 'none') return out;
  if (m.status === 'failed' && m.errorDesc !== null) out['error-desc'] = m.errorDesc;
  if (m.socketAddress !== null) {
    out['socket-address'] = m.socketAddress.map((a) => ({ type: 'inet', host: a.host, port: String(a.port) }));
  }
  const end = m.endTimeMs ?? nowMs;
  const finished = m.status === 'completed';
  out['total-time'] = Math.round(end - m.startTimeMs);
  out['setup-time'] = Math.round(m.setupTimeMs);
  if (m.downtimeMs !== null) out.downtime = Math.round(m.downtimeMs);
  if (!finished && m.expectedDowntimeMs !== null) out['expected-downtime'] = Math.round(m.expectedDowntimeMs);
  const seconds = Math.max(0.001, (end - m.startTimeMs) / 1000);
  out.ram = {
    transferred: m.transferredBytes,
    total: m.totalBytes,
    remaining: finished ? 0 : m.remainingBytes,
    duplicate: m.zeroPages,
    normal: m.normalPages,
    'normal-bytes': m.normalPages * limits.pageBytes,
    'dirty-sync-count': m.dirtySyncCount,
    mbps: m.bandwidthBytesPerMs > 0 ? (m.bandwidthBytesPerMs * 1000 * 8) / 1e6 : (m.transferredBytes * 8) / 1e6 / seconds,
    'dirty-pages-rate': Math.round(m.dirtyPagesRate),
    'page-size': limits.pageBytes,
    // The rest of QEMU's MigrationStats, which it always sends (clients that decode the reply
    // into fixed types need them). No postcopy here: those are 0.
    'multifd-bytes': m.multifdBytes,
    'pages-per-second': Math.round(m.pagesPerSecond),
    'precopy-bytes': m.transferredBytes - m.downtimeBytes,
    'downtime-bytes': m.downtimeBytes,
    'postcopy-bytes': 0,
    'postcopy-requests': 0,
    'dirty-sync-missed-zero-copy': 0,
  };
  out.disk = { transferred: m.diskBlocks * limits.diskBlockBytes, blocks: m.diskBlocks };
  return out;
}
