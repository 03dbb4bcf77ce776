/**
 * `assert` is for things that cannot happen. It throws an AssertionFailure, which no code
 * catches on purpose: a broken invariant ends the process, and a crash fails over.
 */
export class AssertionFailure extends Error {
  override name = 'AssertionFailure';
}

export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new AssertionFailure(message);
}

export function unreachable(value: never, what: string): never {
  throw new AssertionFailure(`unreachable ${what}: ${String(value)}`);
}
