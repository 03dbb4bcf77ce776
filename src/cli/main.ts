#!/usr/bin/env node
import { ColoError, errorMessage } from '../core/errors.js';
import { runCommand } from './run.js';
import { qmpCommand } from './qmp.js';
import { imgCommand } from './img.js';
import { migrateCommand } from './migrate.js';
import { upCommand } from './up.js';

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
                      [--parallel-connections N] [--checkpoint-delay MS] [--state-dir DIR]
                      [-- GUEST-ARGS...]
                                               a protected pair (primary + secondary) with
                                               automatic failover and re-protection
  colo qmp ADDRESS COMMAND [key=value ...]     run one QMP command (qmp-shell style)
  colo img create [--if-missing] FILE SIZE      create a raw disk image
  colo help                                    this text
`;

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
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
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(usage);
      return cmd === undefined ? 2 : 0;
    default:
      process.stderr.write(`colo: unknown command '${cmd}' (try 'colo help')\n`);
      return 2;
  }
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
