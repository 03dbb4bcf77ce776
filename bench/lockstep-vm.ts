/**
 * The lock-step floor in one process (bench/colo.ts, floorTable): `colo run` with a second vCPU.
 *
 * The least any lock-stepping system can do on one host: one front end (the lone VM's own, on
 * its main thread) hands every client input event to two copies of the guest, each in a vCPU
 * thread of its own, and writes a reply byte to the client only once both copies produced it
 * (the bytes compared). No mirror socket, no second process, no checkpoint, no state transfer:
 * it is the lone VM plus exactly the work of a second copy and the wait for the later one. With
 * SECOND_VCPU_CPUS (a CPU list) the second vCPU's thread is pinned there (two-host: the
 * secondary's core), the rest of the process where taskset put it.
 *
 * Argv as `colo run` takes it (`run GUEST.wasm --net listen=... --qmp ... --serial ...`), so
 * that BenchVm starts it as it starts a VM. Not a product: no migration or COLO on this VM.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { parseRunArgs } from '../src/cli/options.js';
import { registerCommands } from '../src/control/commands.js';
import { QmpServer } from '../src/control/qmp-server.js';
import { Vm } from '../src/control/vm.js';
import { loadGuest } from '../src/machine/instrument.js';
import { Machine } from '../src/machine/machine.js';
import type { NicOutput } from '../src/net/nic.js';

interface ConnCopies {
  /** The first copy's output not yet released (it waits for the second's). */
  first: NicOutput[];
  /** The second copy's 'out' bytes not yet matched, in order, and where they end. */
  second: Uint8Array[];
  secondEnd: number;
  /** The second copy shut or closed the connection. */
  secondDone: boolean;
}

function threads(): Set<string> {
  return new Set(fs.readdirSync('/proc/self/task'));
}

async function main(argv: string[]): Promise<number> {
  if (argv[0] !== 'run') throw new Error('usage: lockstep-vm run GUEST.wasm [colo run options]');
  const opts = parseRunArgs(argv.slice(1));
  const vm = await Vm.create(opts);
  const before = threads();
  const second = await Machine.create({
    guest: await loadGuest(opts.guestPath, { storeLog: opts.storeLog ?? true }),
    memoryBytesMax: opts.memoryBytes,
    args: [opts.name ?? 'kv', ...opts.guestArgs],
    env: [],
    serial: { kind: 'none' },
    drive: null,
  });
  const pinTo = process.env.SECOND_VCPU_CPUS;
  if (pinTo !== undefined && pinTo !== '') {
    const made = [...threads()].filter((tid) => !before.has(tid));
    // The second machine's vCPU is its one new thread (V8's helpers and libuv's pool exist by now).
    if (made.length !== 1) throw new Error(`expected one new thread for the second vCPU, found ${made.length}`);
    for (const tid of made) {
      const r = spawnSync('taskset', ['-p', '-c', pinTo, tid], { encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`taskset of the second vCPU's thread ${tid}: ${r.stderr}`);
    }
  }

  let mismatches = 0;
  const conns = new Map<number, ConnCopies>();
  const copies = (conn: number): ConnCopies => {
    let c = conns.get(conn);
    if (c === undefined) {
      c = { first: [], second: [], secondEnd: 0, secondDone: false };
      conns.set(conn, c);
    }
    return c;
  };
  /** Compares n bytes of `bytes` against the second copy's next n, and drops those. */
  const matchSecond = (c: ConnCopies, bytes: Uint8Array): void => {
    let at = 0;
    while (at < bytes.byteLength) {
      const head = c.second[0]!;
      const n = Math.min(head.byteLength, bytes.byteLength - at);
      for (let i = 0; i < n; i++) {
        if (head[i] !== bytes[at + i]) {
          mismatches++;
          break;
        }
      }
      at += n;
      if (n === head.byteLength) c.second.shift();
      else c.second[0] = head.subarray(n);
    }
  };
  const release = (conn: number, c: ConnCopies): void => {
    while (c.first.length > 0) {
      const o = c.first[0]!;
      if (o.kind !== 'out') {
        if (!c.secondDone) return;
        c.first.shift();
        vm.frontEnd?.deliver(o);
        continue;
      }
      const ready = Math.min(o.offset + o.bytes.byteLength, c.secondEnd) - o.offset;
      if (ready <= 0) return;
      const part = ready === o.bytes.byteLength ? o.bytes : o.bytes.subarray(0, ready);
      matchSecond(c, part);
      vm.frontEnd?.deliver({ kind: 'out', conn, offset: o.offset, bytes: part });
      if (ready === o.bytes.byteLength) c.first.shift();
      else c.first[0] = { kind: 'out', conn, offset: o.offset + ready, bytes: o.bytes.subarray(ready) };
    }
    if (c.secondDone && c.second.length === 0) conns.delete(conn);
  };
  vm.inputTap = (ev) => second.injectInput(ev);
  vm.outputSink = (out) => {
    const c = copies(out.conn);
    c.first.push(out);
    release(out.conn, c);
  };
  second.on('output', (out: NicOutput) => {
    const c = copies(out.conn);
    if (out.kind === 'out') {
      c.second.push(out.bytes);
      c.secondEnd = out.offset + out.bytes.byteLength;
    } else c.secondDone = true;
    release(out.conn, c);
  });

  let resolveExit!: (code: number) => void;
  const exited = new Promise<number>((r) => (resolveExit = r));
  const qmp = new QmpServer();
  registerCommands(qmp, vm);
  vm.on('qmp-event', (name: string, data?: Record<string, unknown>) => qmp.emit(name, data));
  vm.on('quit', (code: number) => {
    void (async () => {
      process.stderr.write(`lockstep-vm: ${mismatches} released chunks differed between the copies\n`);
      await qmp.close();
      await second.destroy();
      await vm.destroy();
      resolveExit(code);
    })();
  });
  if (opts.qmp === null) throw new Error('lockstep-vm needs --qmp');
  await qmp.listen(opts.qmp);
  await second.cont();
  await vm.boot();
  return exited;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`lockstep-vm: ${err instanceof Error ? err.stack : String(err)}\n`);
    process.exit(1);
  },
);
