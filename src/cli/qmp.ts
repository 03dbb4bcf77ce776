import { UsageError } from '../core/errors.js';
import { runQmpCommand } from '../control/qmp-shell.js';

export const qmpUsage = `usage: colo qmp unix:PATH|tcp:HOST:PORT COMMAND [key=value ...]
  runs one QMP command and prints its answer (qmp-shell style: key=value arguments, values
  parsed as JSON when they can be, e.g. colo qmp unix:/tmp/p.qmp migrate uri=tcp:127.0.0.1:4444)
`;

/** `colo qmp ADDRESS COMMAND [key=value ...]` */
export async function qmpCommand(argv: string[]): Promise<number> {
  const [address, ...words] = argv;
  if (address === undefined || words.length === 0) {
    throw new UsageError('BAD_OPTION', qmpUsage.trimEnd());
  }
  return runQmpCommand(address, words, process.stdout, { err: process.stderr });
}
