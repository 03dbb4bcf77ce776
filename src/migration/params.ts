import { limits } from '../core/limits.js';
import { QmpCommandError } from '../core/errors.js';

/**
 * Migration capabilities and parameters, with QEMU's QMP names
 * (migrate-set-capabilities / migrate-set-parameters and their query commands).
 */
export const capabilityNames = ['multifd', 'return-path', 'x-colo', 'events'] as const;
export type CapabilityName = (typeof capabilityNames)[number];
export type MigrationCapabilities = Record<CapabilityName, boolean>;

export interface MigrationParameters {
  /** Multifd channels besides the main one (QEMU default 2). */
  'multifd-channels': number;
  /** Bytes per second; 0 = no limit (QEMU's default is 128 MiB/s; colo-vm targets loopback and LAN speeds). */
  'max-bandwidth': number;
  /** Largest pause (ms) the source accepts for stop-and-copy. */
  'downtime-limit': number;
  /** COLO: ms between periodic checkpoints. */
  'x-checkpoint-delay': number;
}

export const parameterSchema = {
  '*multifd-channels': 'uint',
  '*max-bandwidth': 'uint',
  '*downtime-limit': 'uint',
  '*x-checkpoint-delay': 'uint',
} as const;

export type ParameterUpdate = Partial<MigrationParameters>;

export class MigrationSettings {
  readonly capabilities: MigrationCapabilities = { multifd: false, 'return-path': false, 'x-colo': false, events: false };
  readonly parameters: MigrationParameters = {
    'multifd-channels': limits.multifdChannelsDefault,
    'max-bandwidth': 0,
    'downtime-limit': limits.downtimeLimitMsDefault,
    'x-checkpoint-delay': limits.checkpointDelayMsDefault,
  };

  /** Validates every entry before changing any (QEMU applies a capability list atomically). */
  setCapabilities(list: readonly { capability: CapabilityName; state: boolean }[]): void {
    for (const { capability } of list) {
      if (!capabilityNames.includes(capability)) throw new QmpCommandError('GenericError', `Capability '${String(capability)}' is not supported by colo-vm`);
    }
    for (const { capability, state } of list) this.capabilities[capability] = state;
  }

  setParameters(update: ParameterUpdate): void {
    const ch = update['multifd-channels'];
    if (ch !== undefined && (ch < 1 || ch > limits.multifdChannelsMax)) {
      throw new QmpCommandError('GenericError', `Parameter 'multifd-channels' expects a value between 1 and ${limits.multifdChannelsMax}`);
    }
    const dl = update['downtime-limit'];
    if (dl !== undefined && dl > limits.downtimeLimitMsMax) {
      throw new QmpCommandError('GenericError', `Parameter 'downtime-limit' expects an integer in the range of 0 to ${limits.downtimeLimitMsMax} milliseconds`);
    }
    const cd = update['x-checkpoint-delay'];
    if (cd !== undefined && cd > limits.checkpointDelayMsMax) throw new QmpCommandError('GenericError', "Parameter 'x-checkpoint-delay' expects uint32");
    for (const [k, v] of Object.entries(update) as [keyof MigrationParameters, number | undefined][]) {
      if (v !== undefined) this.parameters[k] = v;
    }
  }

  queryCapabilities(): { capability: CapabilityName; state: boolean }[] {
    return capabilityNames.map((capability) => ({ capability, state: this.capabilities[capability] }));
  }

  queryParameters(): MigrationParameters {
    return { ...this.parameters };
  }
}
