/**
 * max-bandwidth for one sender during one round: `pace()` after each write waits until the
 * bytes written fit in the rate. `set()` takes effect at once, also inside a wait: a
 * migrate-set-parameters max-bandwidth during a long, throttled round (round 1 of a large
 * guest) must not wait for the round's end, as in QEMU. Counted from the last change.
 */
export class RateLimit {
  private since: number;
  private bytesAt = 0;
  private sent = 0;
  private wake: (() => void) | null = null;

  /** @param bytesPerSecond 0: no limit. */
  constructor(private bytesPerSecond: number) {
    this.since = performance.now();
  }

  /** The rate now (bytes per second, 0: no limit), as last set. */
  get rate(): number {
    return this.bytesPerSecond;
  }

  /** The sender is going away (cancel, failure, quit): a wait in pace() ends now, and no other starts. */
  stop(): void {
    this.set(0);
  }

  set(bytesPerSecond: number): void {
    this.bytesPerSecond = bytesPerSecond;
    this.since = performance.now();
    this.bytesAt = this.sent;
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  /** `total` bytes were written so far (this round); resolves when they fit in the rate. */
  async pace(total: number): Promise<void> {
    this.sent = total;
    for (;;) {
      if (this.bytesPerSecond <= 0) return;
      const ahead = ((this.sent - this.bytesAt) / this.bytesPerSecond) * 1000 - (performance.now() - this.since);
      if (ahead <= 1) return;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          this.wake = null;
          resolve();
        }, ahead);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }
}
