import fs from 'node:fs';
import { UsageError, errorMessage } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { parseSize } from './options.js';

export const imgUsage = `usage: colo img create [--if-missing] FILE SIZE
  creates a raw disk image of SIZE bytes (examples: 64M, 1G), as qemu-img create -f raw
  --if-missing                leave FILE as it is if it exists
`;

/** A failure to make the image (not a usage error): one line, status 1, as qemu-img's. */
function failed(message: string): number {
  process.stderr.write(`colo img: ${message}\n`);
  return 1;
}

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
  // lstat, not exists: a symbolic link to nothing is there too (open would refuse it).
  let existing: fs.Stats | undefined;
  try {
    existing = fs.lstatSync(file, { throwIfNoEntry: false });
  } catch (err) {
    return failed(`cannot create '${file}': ${errorMessage(err)}`);
  }
  if (existing !== undefined) {
    if (ifMissing) return 0;
    throw new UsageError('BAD_OPTION', `'${file}' exists (use --if-missing to keep it)`);
  }
  let fd: number;
  try {
    fd = fs.openSync(file, 'wx');
  } catch (err) {
    // Made meanwhile by another `--if-missing` run: that one is the image.
    if (ifMissing && (err as NodeJS.ErrnoException).code === 'EEXIST') return 0;
    return failed(`cannot create '${file}': ${errorMessage(err)}`);
  }
  try {
    fs.ftruncateSync(fd, size);
  } catch (err) {
    // No image of the wrong size is left behind (a later --if-missing would keep it).
    fs.closeSync(fd);
    fs.rmSync(file, { force: true });
    return failed(`cannot make '${file}' ${size} bytes long: ${errorMessage(err)}`);
  }
  fs.closeSync(fd);
  process.stdout.write(`Formatting '${file}', fmt=raw size=${size}\n`);
  return 0;
}
