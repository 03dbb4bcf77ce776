import * as v from '../../core/validate.js';

function hostNs(): bigint {
  return process.hrtime.bigint();
}

/**
 * The guest clock. Monotonic time is guest time: it stops while the VM is paused and carries
 * on from the saved value after a restore, a migration or a failover, so a guest never sees
 * its monotonic clock jump or go backwards. Realtime is the host's wall clock.
 */
export class Clock {
  private guestNsAtResume = 1_000_000_000n;
  private hostNsAtResume = hostNs();
  private running = false;

  monotonicNs(): bigint {
    if (!this.running) return this.guestNsAtResume;
    return this.guestNsAtResume + (hostNs() - this.hostNsAtResume);
  }

  realtimeNs(): bigint {
    return BigInt(Math.round((performance.timeOrigin + performance.now()) * 1000)) * 1000n;
  }

  resume(): void {
    if (this.running) return;
    this.hostNsAtResume = hostNs();
    this.running = true;
  }

  pause(): void {
    if (!this.running) return;
    this.guestNsAtResume = this.monotonicNs();
    this.running = false;
  }

  save(): { monotonicNs: bigint } {
    return { monotonicNs: this.monotonicNs() };
  }

  restore(raw: unknown): void {
    const s = v.record(raw, 'clock');
    this.guestNsAtResume = v.bigintValue(s.monotonicNs, 'clock.monotonicNs');
    this.hostNsAtResume = hostNs();
  }
}
