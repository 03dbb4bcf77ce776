import { QmpClient } from '../control/qmp-client.js';
import { parseAddress } from '../control/address.js';
import { UsageError, errorMessage } from '../core/errors.js';
import { limits } from '../core/limits.js';

/**
 * `colo migrate SOURCE-QMP tcp:HOST:PORT [options]`: live-migrate the VM behind a QMP socket,
 * in the spirit of `virsh migrate --live`: flags become capabilities and parameters, and a
 * progress bar runs until the migration ends (\r-updated on a terminal, one line per second
 * otherwise). Ctrl-C cancels the migration.
 */
export interface MigrateOptions {
  source: string;
  uri: string;
  target: string | null;
  parallel: boolean;
  connections: number | null;
  bandwidthMiB: number | null;
  downtimeMs: number | null;
  quiet: boolean;
}

export const migrateUsage = `usage: colo migrate SOURCE-QMP tcp:HOST:PORT [options]
  --parallel                  use multifd channels (capability multifd)
  --parallel-connections N    number of multifd channels (implies --parallel)
  --bandwidth MIB             limit the migration to MIB MiB/s
  --downtime MS               the largest pause accepted for the switchover (downtime-limit)
  --target-qmp ADDRESS        also configure the destination, and start listening there if
                              it was started with --incoming defer
  --quiet                     no progress bar
`;

function intArg(v: string | undefined, flag: string, min: number, max: number): number {
  const n = Number(v);
  if (v === undefined || !Number.isInteger(n) || n < min || n > max) throw new UsageError('BAD_OPTION', `${flag}: expected an integer between ${min} and ${max}`);
  return n;
}

export function parseMigrateArgs(argv: string[]): MigrateOptions {
  const o: MigrateOptions = { source: '', uri: '', target: null, parallel: false, connections: null, bandwidthMiB: null, downtimeMs: null, quiet: false };
  const positional: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i]!;
    let value: string | undefined;
    const eq = a.startsWith('--') ? a.indexOf('=') : -1;
    if (eq > 0) {
      value = a.slice(eq + 1);
      a = a.slice(0, eq);
    }
    const next = (): string | undefined => value ?? argv[++i];
    switch (a) {
      case '--parallel':
        o.parallel = true;
        break;
      case '--parallel-connections':
        o.parallel = true;
        o.connections = intArg(next(), a, 1, limits.multifdChannelsMax);
        break;
      case '--bandwidth':
        o.bandwidthMiB = intArg(next(), a, 1, 1024 * 1024);
        break;
      case '--downtime':
        o.downtimeMs = intArg(next(), a, 0, limits.downtimeLimitMsMax);
        break;
      case '--target-qmp': {
        const t = next();
        if (t === undefined) throw new UsageError('BAD_OPTION', '--target-qmp needs an address');
        o.target = t;
        break;
      }
      case '--quiet':
        o.quiet = true;
        break;
      default:
        if (a.startsWith('-')) throw new UsageError('BAD_OPTION', `unknown option '${a}'\n${migrateUsage}`);
        positional.push(a);
    }
  }
  if (positional.length !== 2) throw new UsageError('BAD_OPTION', migrateUsage.trimEnd());
  o.source = positional[0]!;
  o.uri = positional[1]!;
  if (!o.uri.startsWith('tcp:')) throw new UsageError('BAD_OPTION', `the target must be tcp:HOST:PORT, got '${o.uri}'`);
  // Bad addresses are usage errors (status 2) here; a VM that cannot be reached is a failure (1).
  parseAddress(o.uri);
  parseAddress(o.source);
  if (o.target !== null) parseAddress(o.target);
  return o;
}

interface Info {
  status?: string;
  'error-desc'?: string;
  'total-time'?: number;
  downtime?: number;
  ram?: { transferred: number; total: number; remaining: number; mbps: number; 'dirty-pages-rate': number; 'dirty-sync-count': number };
}

function gib(bytes: number): string {
  return bytes >= 1 << 30 ? `${(bytes / 2 ** 30).toFixed(2)} GiB` : `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

/** One progress line (no newline). */
export function progressLine(info: Info, width = 24): string {
  const ram = info.ram;
  if (ram === undefined) return `migrate: ${info.status ?? 'none'}`;
  const done = ram.total > 0 ? Math.max(0, Math.min(1, (ram.total - ram.remaining) / ram.total)) : 0;
  const fill = Math.round(done * width);
  const bar = '#'.repeat(fill) + '.'.repeat(width - fill);
  return (
    `migrate: [${bar}] ${String(Math.round(done * 100)).padStart(3)}%  ${info.status ?? ''}  ` +
    `sent ${gib(ram.transferred)}  remaining ${gib(ram.remaining)}  ${(ram.mbps / 8000).toFixed(2)} GB/s  ` +
    `dirty ${ram['dirty-pages-rate']} pages/s  round ${ram['dirty-sync-count'] + 1}`
  );
}

export async function migrateCommand(argv: string[]): Promise<number> {
  const o = parseMigrateArgs(argv);
  const err = process.stderr;
  // As colo qmp: a port that accepts and says nothing (not QMP: a guest's own service) fails
  // after limits.qmpShellGreetingTimeoutMs, not after the whole connect timeout.
  const connectOptions = { greetingTimeoutMs: limits.qmpShellGreetingTimeoutMs };
  let src: QmpClient;
  try {
    src = await QmpClient.connect(o.source, connectOptions);
  } catch (e) {
    // A VM that is not there (or not answering) is not a usage error: status 1, as colo qmp.
    err.write(`colo migrate: ${errorMessage(e)}\n`);
    return 1;
  }
  let dst: QmpClient | null = null;
  try {
    dst = o.target === null ? null : await QmpClient.connect(o.target, connectOptions);
  } catch (e) {
    // Its open connection would keep this process alive (and hold one of the source's slots).
    await src.close().catch(() => undefined);
    err.write(`colo migrate: ${errorMessage(e)}\n`);
    return 1;
  }
  try {
    const caps = [{ capability: 'multifd', state: o.parallel }];
    await src.execute('migrate-set-capabilities', { capabilities: caps });
    const params: Record<string, number> = {};
    if (o.connections !== null) params['multifd-channels'] = o.connections;
    if (o.bandwidthMiB !== null) params['max-bandwidth'] = o.bandwidthMiB * 1024 * 1024;
    if (o.downtimeMs !== null) params['downtime-limit'] = o.downtimeMs;
    if (Object.keys(params).length > 0) await src.execute('migrate-set-parameters', params);
    if (dst !== null) {
      await dst.execute('migrate-set-capabilities', { capabilities: caps });
      if (o.connections !== null) await dst.execute('migrate-set-parameters', { 'multifd-channels': o.connections });
      const state = await dst.execute<Info>('query-migrate');
      if (state.status === undefined) await dst.execute('migrate-incoming', { uri: o.uri });
    }
    await src.execute('migrate', { uri: o.uri });
    let cancelled = false;
    const onSigint = (): void => {
      // A second Ctrl-C ends this process at once (the default action), as it would have
      // without the handler: the cancel is sent, and the source may be slow to answer.
      process.off('SIGINT', onSigint);
      if (cancelled) return;
      cancelled = true;
      err.write('\nmigrate: cancelling (Ctrl-C again to stop waiting)\n');
      void src.execute('migrate_cancel').catch(() => undefined);
    };
    process.on('SIGINT', onSigint);
    const tty = err.isTTY === true && !o.quiet;
    let lastLine = 0;
    let info: Info = {};
    try {
      for (;;) {
        info = await src.execute<Info>('query-migrate');
        const s = info.status ?? 'none';
        // 'colo' (x-colo on): the migration never completes; the pair runs in lock-step from
        // here, and waiting on would poll for ever.
        const ended = s === 'completed' || s === 'failed' || s === 'cancelled' || s === 'colo';
        if (!o.quiet) {
          if (tty) err.write(`\r${progressLine(info)}\x1b[K`);
          else if (ended || Date.now() - lastLine >= 1000) {
            err.write(`${progressLine(info)}\n`);
            lastLine = Date.now();
          }
        }
        if (ended) break;
        await new Promise((r) => setTimeout(r, tty ? 200 : 250));
      }
    } finally {
      process.off('SIGINT', onSigint);
    }
    if (tty) err.write('\n');
    if (info.status === 'completed') {
      process.stdout.write(
        `migration completed in ${info['total-time'] ?? '?'} ms, downtime ${info.downtime ?? '?'} ms, ${gib(info.ram?.transferred ?? 0)} transferred\n`,
      );
      return 0;
    }
    if (info.status === 'colo') {
      process.stdout.write(`migration entered COLO in ${info['total-time'] ?? '?'} ms: the destination is the secondary, checkpointed from now on\n`);
      return 0;
    }
    err.write(`colo migrate: migration ${info.status ?? 'ended'}${info['error-desc'] === undefined ? '' : `: ${info['error-desc']}`}\n`);
    return cancelled ? 130 : 1;
  } catch (e) {
    err.write(`colo migrate: ${errorMessage(e)}\n`);
    return 1;
  } finally {
    await src.close();
    await dst?.close();
  }
}
