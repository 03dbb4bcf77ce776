import { UsageError } from '../core/errors.js';
import { runQmpCommand } from '../control/qmp-shell.js';

/** `colo qmp ADDRESS COMMAND [key=value ...]` */
export async function qmpCommand(argv: string[]): Promise<number> {
  const [address, ...words] = argv;
  if (address === undefined || words.length === 0) {
    throw new UsageError('BAD_OPTION', 'usage: colo qmp unix:PATH|tcp:HOST:PORT COMMAND [key=value ...]');
  }
  return runQmpCommand(address, words, process.stdout, { err: process.stderr });
}
