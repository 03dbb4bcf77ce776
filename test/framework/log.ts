/** What colo's logger writes (to stderr), as tests read it. */
import type { TestContext } from 'node:test';

/** Log lines written to stderr during the test, one entry a line; stderr still gets them. */
export function captureLog(t: TestContext): string[] {
  const lines: string[] = [];
  const write = process.stderr.write;
  process.stderr.write = ((chunk: string | Uint8Array, ...rest: unknown[]): boolean => {
    lines.push(...String(chunk).split('\n').filter((l) => l !== ''));
    return (write as (c: string | Uint8Array, ...r: unknown[]) => boolean).call(process.stderr, chunk, ...rest);
  }) as typeof process.stderr.write;
  t.after(() => {
    process.stderr.write = write;
  });
  return lines;
}
