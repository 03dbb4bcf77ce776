import fs from 'node:fs';
import { UsageError } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { parseSize } from './options.js';

export const imgUsage = `usage: colo img create [--if-missing] FILE SIZE
  creates a raw disk image of SIZE bytes (examples: 64M, 1G), as qemu-img create -f raw
  --if-missing                leave FILE as it is if it exists
`;

/** `colo img create [--if-missing] FILE SIZE`: a raw disk image, as `qemu-img create -f raw`. */
export function imgCommand(argv: string[]): number {
  const [sub, ...rest] = argv;
  if (sub !== 'create') throw new UsageError('BAD_OPTION', imgUsage.trimEnd());
  const ifMissing = rest[0] === '--if-missing';
  const args = ifMissing ? rest.slice(1) : rest;
  if (args.length !== 2) throw new UsageError('BAD_OPTION', imgUsage.trimEnd());
  const [file, sizeText] = args as [string, string];
  const size = parseSize(sizeText, 'SIZE');
  if (size % limits.diskBlockBytes !== 0 || size > limits.diskBytesMax) {
    throw new UsageError('BAD_OPTION', `SIZE must be a multiple of ${limits.diskBlockBytes} bytes and at most ${limits.diskBytesMax}`);
  }
  if (fs.existsSync(file)) {
    if (ifMissing) return 0;
    throw new UsageError('BAD_OPTION', `'${file}' exists (use --if-missing to keep it)`);
  }
  const fd = fs.openSync(file, 'wx');
  fs.ftruncateSync(fd, size);
  fs.closeSync(fd);
  process.stdout.write(`Formatting '${file}', fmt=raw size=${size}\n`);
  return 0;
}
