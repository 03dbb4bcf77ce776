#!/usr/bin/env node
import { ColoError, errorMessage } from '../core/errors.js';
import { runCommand } from './run.js';
import { qmpCommand, qmpUsage } from './qmp.js';
import { imgCommand, imgUsage } from './img.js';
import { migrateCommand, migrateUsage } from './migrate.js';
import { upCommand, upUsage } from './up.js';
import { runUsage } from './options.js';

const usage = `colo — COLO fault tolerance for WebAssembly virtual machines

usage:
  colo run GUEST.wasm [--memory SIZE] [--drive file=PATH[,snapshot=on]] [--snapshot]
                      [--net listen=HOST:PORT] [--serial file:PATH|stdio|none]
                      [--qmp unix:PATH|tcp:HOST:PORT] [-S] [--name NAME]
                      [--incoming defer|tcp:HOST:PORT|file:PATH] [--dirty-log store|shadow]
                      [-- GUEST-ARGS...]
  colo migrate SOURCE-QMP tcp:HOST:PORT [--parallel] [--parallel-connections N]
                      [--bandwidth MIB] [--downtime MS] [--target-qmp ADDRESS] [--quiet]
                                               live-migrate a VM, with a progress bar
  colo up GUEST.wasm --net listen=HOST:PORT [--memory SIZE] [--drive file=PATH]
                      [--parallel-connections N] [--checkpoint-delay MS]
                      [--heartbeat-timeout MS] [--protect-timeout MS] [--state-dir DIR]
                      [-- GUEST-ARGS...]
                                               a protected pair (primary + secondary) with
                                               automatic failover and re-protection
  colo qmp ADDRESS COMMAND [key=value ...]     run one QMP command (qmp-shell style)
  colo img create [--if-missing] FILE SIZE      create a raw disk image
  colo help [COMMAND]                          this text, or a command's options
                                               (as COMMAND --help)
`;

const commandUsage: Record<string, string> = { run: runUsage, migrate: migrateUsage, up: upUsage, qmp: qmpUsage, img: imgUsage };

/** `--help` or `-h` among a command's options (not among the guest's arguments, after `--`). */
function asksHelp(args: readonly string[]): boolean {
  for (const a of args) {
    if (a === '--') return false;
    if (a === '--help' || a === '-h') return true;
  }
  return false;
}

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (cmd !== undefined && Object.hasOwn(commandUsage, cmd) && asksHelp(rest)) {
    process.stdout.write(commandUsage[cmd]!);
    return 0;
  }
  switch (cmd) {
    case 'run':
      return runCommand(rest);
    case 'qmp':
      return qmpCommand(rest);
    case 'img':
      return imgCommand(rest);
    case 'migrate':
      return migrateCommand(rest);
    case 'up':
      return upCommand(rest);
    case 'help': {
      const topic = rest[0];
      if (topic === undefined || topic === 'help' || topic === '--help' || topic === '-h') break;
      if (!Object.hasOwn(commandUsage, topic)) {
        process.stderr.write(`colo: no command '${topic}' (commands: ${Object.keys(commandUsage).join(', ')})\n`);
        return 2;
      }
      process.stdout.write(commandUsage[topic]!);
      return 0;
    }
    case undefined:
    case '--help':
    case '-h':
      break;
    default:
      process.stderr.write(`colo: unknown command '${cmd}' (try 'colo help')\n`);
      return 2;
  }
  process.stdout.write(usage);
  return cmd === undefined ? 2 : 0;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    if (err instanceof ColoError) {
      process.stderr.write(`colo: ${err.message}\n`);
      process.exitCode = 2;
    } else {
      process.stderr.write(`colo: internal error: ${err instanceof Error ? (err.stack ?? err.message) : errorMessage(err)}\n`);
      process.exitCode = 70;
    }
  },
);
