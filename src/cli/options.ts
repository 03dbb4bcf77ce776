import { limits } from '../core/limits.js';
import { UsageError, errorMessage } from '../core/errors.js';
import { parseAddress } from '../control/address.js';

/** Parse a size like 256M, 1G, 65536, 64K (binary units, as QEMU's -m). */
export function parseSize(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)(?:i?B)?$/i.exec(text.trim());
  if (m === null) throw new UsageError('BAD_SIZE', `${what}: '${text}' is not a size (examples: 256M, 1G, 65536)`);
  const unit = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  const n = Math.floor(Number(m[1]) * unit);
  if (!Number.isFinite(n) || n <= 0) throw new UsageError('BAD_SIZE', `${what}: '${text}' is not a positive size`);
  return n;
}

/** `--memory SIZE` of `colo run` and `colo up`: a size between one wasm page and limits.guestMemoryBytesMax. */
export function parseMemory(text: string): number {
  const n = parseSize(text, '--memory');
  if (n < limits.wasmPageBytes || n > limits.guestMemoryBytesMax) {
    throw new UsageError('BAD_OPTION', `--memory: must be between 64K and ${Math.floor(limits.guestMemoryBytesMax / 1048576)}M`);
  }
  return n;
}

/** Parse QEMU-style `key=value,key=value` (a bare first word goes to `implied`). */
export function parseKeyValues(text: string, what: string, implied?: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const [i, part] of text.split(',').entries()) {
    if (part === '') throw new UsageError('BAD_OPTION', `${what}: empty item in '${text}'`);
    const eq = part.indexOf('=');
    if (eq < 0) {
      if (i === 0 && implied !== undefined) {
        out.set(implied, part);
        continue;
      }
      throw new UsageError('BAD_OPTION', `${what}: '${part}' should be key=value`);
    }
    const k = part.slice(0, eq);
    if (out.has(k)) throw new UsageError('BAD_OPTION', `${what}: '${k}' given twice`);
    out.set(k, part.slice(eq + 1));
  }
  return out;
}

export function parseOnOff(value: string, what: string): boolean {
  if (value === 'on' || value === 'true' || value === 'yes') return true;
  if (value === 'off' || value === 'false' || value === 'no') return false;
  throw new UsageError('BAD_OPTION', `${what}: expected on or off, got '${value}'`);
}

export interface RunOptions {
  guestPath: string;
  memoryBytes: number;
  drive: { path: string; snapshot: boolean } | null;
  net: { host: string; port: number } | null;
  netSpec: string | null;
  serial: { kind: 'file'; path: string } | { kind: 'stdio' } | { kind: 'none' };
  qmp: string | null;
  startPaused: boolean;
  name: string | null;
  incoming: string | null;
  guestArgs: string[];
  /** --dirty-log store|shadow; null: the default (store, see control/vm.ts). */
  storeLog: boolean | null;
}

export const runUsage = `usage: colo run GUEST.wasm [options] [-- GUEST-ARGS...]
  --memory SIZE, -m SIZE      guest RAM (examples: 256M, 1G; default ${Math.floor(limits.guestMemoryBytesDefault / 1048576)}M)
  --drive file=PATH[,snapshot=on]
                              the disk (fd 4 in the guest); snapshot=on: writes go to a
                              temporary overlay and the image is never changed
  --snapshot                  snapshot=on for the drive
  --net listen=HOST:PORT      the NIC: the guest serves clients on this address (fd 3)
  --serial file:PATH|stdio|none
                              where the guest's stdout and stderr go (default stdio)
  --qmp unix:PATH|tcp:HOST:PORT
                              the QMP monitor
  -S                          start paused (QMP cont runs it)
  --name NAME                 the VM's name, in its log lines
  --incoming defer|tcp:HOST:PORT|file:PATH
                              wait for an incoming migration (defer: until migrate-incoming)
  --dirty-log store|shadow    how dirty pages are tracked (default store)
`;

const runFlags = new Set(['--memory', '-m', '--drive', '--snapshot', '--net', '--serial', '--qmp', '-S', '--name', '--incoming', '--dirty-log']);

/** `colo run GUEST.wasm [options] [-- guest args...]` */
export function parseRunArgs(argv: string[]): RunOptions {
  const o: RunOptions = {
    guestPath: '',
    memoryBytes: limits.guestMemoryBytesDefault,
    drive: null,
    net: null,
    netSpec: null,
    serial: { kind: 'stdio' },
    qmp: null,
    startPaused: false,
    name: null,
    incoming: null,
    guestArgs: [],
    storeLog: null,
  };
  let snapshotAll = false;
  let driveSnapshot = false;
  const positional: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i]!;
    if (arg === '--') {
      o.guestArgs = argv.slice(i + 1);
      break;
    }
    let value: string | undefined;
    const eq = arg.startsWith('--') ? arg.indexOf('=') : -1;
    if (eq > 0) {
      value = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    if (!arg.startsWith('-')) {
      positional.push(arg);
      continue;
    }
    if (!runFlags.has(arg)) throw new UsageError('BAD_OPTION', `unknown option '${arg}' (see 'colo run --help')`);
    const needValue = (): string => {
      if (value !== undefined) return value;
      const next = argv[i + 1];
      if (next === undefined) throw new UsageError('BAD_OPTION', `option '${arg}' needs a value`);
      i++;
      return next;
    };
    switch (arg) {
      case '--memory':
      case '-m':
        o.memoryBytes = parseMemory(needValue());
        break;
      case '--drive': {
        const kv = parseKeyValues(needValue(), '--drive');
        const file = kv.get('file');
        if (file === undefined || file === '') throw new UsageError('BAD_OPTION', `--drive: 'file=PATH' is required`);
        for (const k of kv.keys()) if (k !== 'file' && k !== 'snapshot') throw new UsageError('BAD_OPTION', `--drive: unknown property '${k}'`);
        if (o.drive !== null) throw new UsageError('BAD_OPTION', '--drive: only one drive is supported');
        driveSnapshot = kv.has('snapshot') ? parseOnOff(kv.get('snapshot')!, '--drive snapshot') : false;
        o.drive = { path: file, snapshot: false };
        break;
      }
      case '--snapshot':
        if (value !== undefined) throw new UsageError('BAD_OPTION', '--snapshot takes no value');
        snapshotAll = true;
        break;
      case '--net': {
        const spec = needValue();
        const kv = parseKeyValues(spec, '--net');
        for (const k of kv.keys()) if (k !== 'listen') throw new UsageError('BAD_OPTION', `--net: unknown property '${k}'`);
        const listen = kv.get('listen');
        if (listen === undefined) throw new UsageError('BAD_OPTION', `--net: 'listen=HOST:PORT' is required`);
        // QEMU makes a second NIC of a second -netdev; one is all there is here.
        if (o.net !== null) throw new UsageError('BAD_OPTION', '--net: only one NIC is supported');
        const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(listen);
        if (m === null || Number(m[3]) > 65535) throw new UsageError('BAD_OPTION', `--net: bad listen address '${listen}' (expected HOST:PORT)`);
        o.net = { host: (m[1] ?? m[2])!, port: Number(m[3]) };
        o.netSpec = listen;
        break;
      }
      case '--serial': {
        const s = needValue();
        if (s === 'stdio') o.serial = { kind: 'stdio' };
        else if (s === 'none' || s === 'null') o.serial = { kind: 'none' };
        else if (s.startsWith('file:') && s.length > 5) o.serial = { kind: 'file', path: s.slice(5) };
        else throw new UsageError('BAD_OPTION', `--serial: expected file:PATH, stdio or none, got '${s}'`);
        break;
      }
      case '--qmp': {
        const q = needValue();
        // The parser the monitor listens with (control/address.ts): QEMU's ',server,nowait'
        // is accepted, and a bad port or an over-long socket path is a usage error here, not
        // a failure after the guest was loaded.
        try {
          parseAddress(q);
        } catch (err) {
          throw new UsageError('BAD_OPTION', `--qmp: ${errorMessage(err)}`);
        }
        // QEMU opens a monitor for each -qmp; the first one was dropped without a word.
        if (o.qmp !== null) throw new UsageError('BAD_OPTION', '--qmp: only one QMP monitor is supported');
        o.qmp = q;
        break;
      }
      case '-S':
        o.startPaused = true;
        break;
      case '--name':
        o.name = needValue();
        break;
      case '--incoming': {
        const inc = needValue();
        if (!(inc === 'defer' || /^file:.+/.test(inc) || inc.startsWith('tcp:'))) {
          throw new UsageError('BAD_OPTION', `--incoming: expected defer, tcp:HOST:PORT or file:PATH, got '${inc}'`);
        }
        if (inc.startsWith('tcp:')) {
          try {
            parseAddress(inc);
          } catch (err) {
            throw new UsageError('BAD_OPTION', `--incoming: ${errorMessage(err)}`);
          }
        }
        o.incoming = inc;
        break;
      }
      case '--dirty-log': {
        const d = needValue();
        if (d !== 'store' && d !== 'shadow') throw new UsageError('BAD_OPTION', `--dirty-log: expected store or shadow, got '${d}'`);
        o.storeLog = d === 'store';
        break;
      }
    }
  }
  if (positional.length === 0) throw new UsageError('BAD_OPTION', 'missing the guest module: colo run GUEST.wasm [options]');
  if (positional.length > 1) throw new UsageError('BAD_OPTION', `unexpected argument '${positional[1]}' (guest arguments go after --)`);
  o.guestPath = positional[0]!;
  if (o.drive !== null) o.drive.snapshot = snapshotAll || driveSnapshot;
  return o;
}
