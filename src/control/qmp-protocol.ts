/**
 * QMP protocol logic without sockets: a command dispatcher (registry, argument validation,
 * error mapping) and a per-connection session (bytes in → reply lines out). The socket driver
 * is in qmp-server.ts; tests can drive a session directly.
 *
 * Conventions follow QEMU's monitor/qmp.c and qapi/qmp-dispatch.c:
 * - input is split as QEMU's json-streamer does: a message ends at a newline or where its
 *   top-level object closes (clients that send no newline are answered);
 * - greeting first; only `qmp_capabilities` until negotiation ("Expecting capabilities
 *   negotiation with 'qmp_capabilities'", class CommandNotFound);
 * - `{"execute"|"exec-oob": name, "arguments"?: {...}, "id"?: any}`, other members refused;
 * - in-band commands of one client run one at a time, in order (a JSON parse error is answered
 *   in order too); `exec-oob` commands run at once when out-of-band was negotiated;
 * - replies `{"return": v, "id": id}` / `{"error": {"class", "desc"}, "id": id}`;
 * - events only to negotiated clients.
 */
import { AssertionFailure } from '../core/assert.js';
import { ColoError, QmpCommandError, errorMessage } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { JsonMessageBuffer, JsonSyntaxError, encodeQmpJson, lineTooLong, parseQmpJson, QmpExactInteger, toPlainNumbers } from './qmp-json.js';
import { checkSchema, validateArgs, type QmpArgsOf, type QmpArgsSchema } from './qmp-schema.js';

export interface QmpCommandContext {
  /** The connection that sent the command: 1, 2, ... in order of connection. */
  readonly clientId: number;
  /** True when the command came as `exec-oob`. */
  readonly oob: boolean;
}

export interface QmpCommandSpec<S extends QmpArgsSchema = QmpArgsSchema> {
  /** Command name, e.g. `migrate`, `query-colo-status`, `x-colo-lost-heartbeat`. */
  name: string;
  /** Argument schema (see qmp-schema.ts); omitted = takes no arguments. */
  args?: S;
  /** May run out-of-band (`exec-oob`): overtakes in-band commands. QEMU's `allow-oob`. */
  allowOob?: boolean;
  /**
   * Runs the command with validated arguments. Its (awaited) result is the `return` value
   * (`{}` for undefined). Throw QmpCommandError(class, desc) for a specific error class; any
   * other error becomes GenericError with its message.
   */
  handler: (args: QmpArgsOf<S>, ctx: QmpCommandContext) => unknown;
}

export interface QmpCommandInfo {
  readonly name: string;
  readonly args: QmpArgsSchema;
  readonly allowOob: boolean;
}

interface RegisteredCommand extends QmpCommandInfo {
  readonly handler: (args: Record<string, unknown>, ctx: QmpCommandContext) => unknown;
}

export interface QmpErrorBody {
  class: string;
  desc: string;
}

export type QmpOutcome = { return: unknown } | { error: QmpErrorBody };

function errorOutcome(errorClass: string, desc: string): QmpOutcome {
  return { error: { class: errorClass, desc } };
}

/** Maps an error thrown by a handler to a QMP error body. */
export function errorBody(err: unknown): QmpErrorBody {
  if (err instanceof AssertionFailure) {
    // A broken invariant ends the process (assert.ts); do not let a QMP client swallow it.
    setImmediate(() => {
      throw err;
    });
  }
  if (err instanceof QmpCommandError) return { class: err.errorClass, desc: err.message };
  return { class: 'GenericError', desc: errorMessage(err) };
}

const commandNamePattern = /^[A-Za-z_][A-Za-z0-9_.-]*$/;

export const negotiationDesc = "Expecting capabilities negotiation with 'qmp_capabilities'";

/** The registry of commands. `qmp_capabilities` and `query-commands` are built in. */
export class QmpDispatcher {
  private readonly commands = new Map<string, RegisteredCommand>();

  constructor() {
    this.register({
      name: 'qmp_capabilities',
      args: { '*enable': [{ enum: ['oob'] }] },
      handler: () => {
        // Reached only after negotiation: the session handles the first one itself.
        throw new QmpCommandError('CommandNotFound', 'Capabilities negotiation is already complete, command ignored');
      },
    });
    this.register({
      name: 'query-commands',
      handler: () => this.names().map((name) => ({ name })),
    });
  }

  register<const S extends QmpArgsSchema = {}>(spec: QmpCommandSpec<S>): void {
    const name = spec.name;
    if (typeof name !== 'string' || !commandNamePattern.test(name)) {
      throw new ColoError('QMP_COMMAND_NAME', `bad QMP command name '${String(name)}'`);
    }
    if (this.commands.has(name)) throw new ColoError('QMP_COMMAND_NAME', `QMP command '${name}' is already registered`);
    const args: QmpArgsSchema = spec.args ?? {};
    checkSchema(args, name);
    this.commands.set(name, {
      name,
      args,
      allowOob: spec.allowOob === true,
      handler: spec.handler as unknown as RegisteredCommand['handler'],
    });
  }

  get(name: string): QmpCommandInfo | undefined {
    return this.commands.get(name);
  }

  names(): string[] {
    return [...this.commands.keys()];
  }

  /** Validates `args` and runs the handler; never rejects. */
  async invoke(name: string, args: Record<string, unknown>, ctx: QmpCommandContext): Promise<QmpOutcome> {
    const cmd = this.commands.get(name);
    if (cmd === undefined) return errorOutcome('CommandNotFound', `The command ${name} has not been found`);
    const problem = validateArgs(cmd.args, args);
    if (problem !== undefined) return errorOutcome('GenericError', problem);
    try {
      const value = await cmd.handler(args, ctx);
      return { return: value === undefined ? {} : value };
    } catch (err) {
      return { error: errorBody(err) };
    }
  }
}

/** What a session needs from its connection. */
export interface QmpSessionIo {
  /** Sends one complete line (ending in "\r\n"). */
  write(line: string): void;
  /** Closes the connection once what was written has been sent. */
  end(): void;
  /** Flow control: stop (false) or resume (true) delivering input with receive(). */
  setReading(reading: boolean): void;
}

export interface QmpSessionOptions {
  clientId: number;
  /** The greeting object (`{"QMP": {...}}`), sent by start(). */
  greeting: unknown;
  lineBytesMax?: number;
  pendingCommandsMax?: number;
  jsonDepthMax?: number;
  /** Sees every line received ('in', without its line end) and sent ('out'). */
  trace?: (direction: 'in' | 'out', line: string) => void;
}

export type QmpSessionState = 'negotiating' | 'ready' | 'closed';

type InbandItem = { readonly request: unknown } | { readonly parseError: string };

const utf8 = new TextDecoder('utf-8', { fatal: true });

function isObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof QmpExactInteger);
}

/** QEMU's qmp_is_oob(): exec-oob without execute is dispatched at once, not queued. */
function isOobRequest(v: unknown): boolean {
  return isObject(v) && Object.hasOwn(v, 'exec-oob') && !Object.hasOwn(v, 'execute');
}

/** Encodes a message as one QMP output line. */
export function qmpLine(message: unknown): string {
  return encodeQmpJson(message) + '\r\n';
}

/** One client connection's protocol state. */
export class QmpSession {
  readonly clientId: number;
  private stateValue: QmpSessionState = 'negotiating';
  private oob = false;
  /** Input split into messages: at a newline, or where a top-level object closes (json-streamer). */
  private readonly lines: JsonMessageBuffer;
  private readonly pendingMax: number;
  private readonly depthMax: number;
  private readonly queue: InbandItem[] = [];
  private running = false;
  private oobRunning = 0;
  private inputEnded = false;
  private reading = true;

  constructor(
    private readonly dispatcher: QmpDispatcher,
    private readonly io: QmpSessionIo,
    private readonly options: QmpSessionOptions,
  ) {
    this.clientId = options.clientId;
    this.lines = new JsonMessageBuffer(options.lineBytesMax ?? limits.qmpLineBytesMax);
    this.pendingMax = options.pendingCommandsMax ?? limits.qmpPendingCommandsMax;
    this.depthMax = options.jsonDepthMax ?? limits.qmpJsonDepthMax;
  }

  get state(): QmpSessionState {
    return this.stateValue;
  }

  get oobEnabled(): boolean {
    return this.oob;
  }

  /** Sends the greeting. */
  start(): void {
    this.writeLine(qmpLine(this.options.greeting));
  }

  /** Bytes from the client. */
  receive(chunk: Uint8Array): void {
    if (this.stateValue === 'closed') return;
    this.lines.push(chunk);
    this.pump();
  }

  /** The client will send nothing more: finish what it sent, answer, then end the connection. */
  endOfInput(): void {
    if (this.stateValue === 'closed') return;
    this.inputEnded = true;
    this.pump();
  }

  /** Sends an already encoded event line if the client has negotiated. */
  sendEvent(line: string): boolean {
    if (this.stateValue !== 'ready') return false;
    this.writeLine(line);
    return true;
  }

  /** The connection is gone or being closed: drop queued commands, send nothing more. */
  shutdown(): void {
    this.stateValue = 'closed';
    this.queue.length = 0;
  }

  private writeLine(line: string): void {
    if (this.stateValue === 'closed') return;
    this.options.trace?.('out', line.slice(0, -2));
    this.io.write(line);
  }

  private full(): boolean {
    return this.queue.length + (this.running ? 1 : 0) >= this.pendingMax || this.oobRunning >= this.pendingMax;
  }

  /** Turns buffered input into requests while there is room for them. */
  private pump(): void {
    while (this.stateValue !== 'closed' && !this.full()) {
      let line = this.lines.shift();
      if (line === undefined && this.inputEnded) line = this.lines.takeRest();
      if (line === lineTooLong) {
        this.writeLine(
          qmpLine(errorOutcome('GenericError', `QMP input line is longer than ${this.lines.lineBytesMax} bytes`)),
        );
        this.shutdown();
        this.io.end();
        return;
      }
      if (line === undefined) break;
      this.acceptLine(line);
    }
    if (this.stateValue === 'closed') return;
    const reading = !this.full();
    if (reading !== this.reading) {
      this.reading = reading;
      this.io.setReading(reading);
    }
    if (
      this.inputEnded &&
      this.lines.bufferedBytes === 0 &&
      this.queue.length === 0 &&
      !this.running &&
      this.oobRunning === 0
    ) {
      this.shutdown();
      this.io.end();
    }
  }

  private acceptLine(bytes: Buffer): void {
    let text: string;
    try {
      text = utf8.decode(bytes);
    } catch {
      this.options.trace?.('in', bytes.toString('latin1'));
      this.enqueue({ parseError: 'invalid UTF-8 sequence' });
      return;
    }
    if (text.endsWith('\r')) text = text.slice(0, -1);
    // Blank: an empty line, or the line end after an object that was already taken.
    if (text.trim() === '') return;
    this.options.trace?.('in', text);
    let request: unknown;
    try {
      // Exact integers: an `id` beyond 2^53 is echoed as sent; arguments get numbers (execute).
      request = parseQmpJson(text, this.depthMax, { exactIntegers: true });
    } catch (err) {
      if (!(err instanceof JsonSyntaxError)) throw err;
      this.enqueue({ parseError: err.message });
      return;
    }
    if (isOobRequest(request)) {
      this.oobRunning++;
      void this.process(request).then((line) => {
        this.oobRunning--;
        this.writeLine(line);
        this.pump();
      });
      return;
    }
    this.enqueue({ request });
  }

  private enqueue(item: InbandItem): void {
    this.queue.push(item);
    void this.drain();
  }

  /** Runs queued in-band items one at a time. */
  private async drain(): Promise<void> {
    if (this.running) return;
    this.running = true;
    while (this.queue.length > 0 && this.stateValue !== 'closed') {
      const item = this.queue.shift()!;
      const line =
        'parseError' in item
          ? qmpLine(errorOutcome('GenericError', `JSON parse error, ${item.parseError}`))
          : await this.process(item.request);
      this.writeLine(line);
      this.pump();
    }
    this.running = false;
    this.pump();
  }

  /** One request → its encoded reply line. Never rejects. */
  private async process(request: unknown): Promise<string> {
    if (!isObject(request)) return qmpLine(errorOutcome('GenericError', 'QMP input must be a JSON object'));
    const hasId = Object.hasOwn(request, 'id');
    const withId = (outcome: QmpOutcome): Record<string, unknown> => (hasId ? { ...outcome, id: request.id } : outcome);
    let outcome: QmpOutcome;
    try {
      outcome = await this.execute(request);
    } catch (err) {
      outcome = { error: errorBody(err) };
    }
    try {
      return qmpLine(withId(outcome));
    } catch (err) {
      const name = String(request.execute ?? request['exec-oob']);
      return qmpLine(withId(errorOutcome('GenericError', `cannot encode the reply of ${name}: ${errorMessage(err)}`)));
    }
  }

  private async execute(request: Record<string, unknown>): Promise<QmpOutcome> {
    let execKey: string | undefined;
    for (const key of Object.keys(request)) {
      const value = request[key];
      if (key === 'execute' || (key === 'exec-oob' && this.oob)) {
        if (typeof value !== 'string') return errorOutcome('GenericError', `QMP input member '${key}' must be a string`);
        if (execKey !== undefined) {
          return errorOutcome('GenericError', `QMP input member '${key}' clashes with '${execKey}'`);
        }
        execKey = key;
      } else if (key === 'arguments') {
        if (!isObject(value)) return errorOutcome('GenericError', "QMP input member 'arguments' must be an object");
      } else if (key !== 'id') {
        return errorOutcome('GenericError', `QMP input member '${key}' is unexpected`);
      }
    }
    if (execKey === undefined) return errorOutcome('GenericError', "QMP input lacks member 'execute'");
    const name = request[execKey] as string;
    const oob = execKey === 'exec-oob';
    const args = toPlainNumbers(request.arguments ?? {}) as Record<string, unknown>;

    if (this.stateValue === 'negotiating') {
      if (name !== 'qmp_capabilities') return errorOutcome('CommandNotFound', negotiationDesc);
      return this.negotiate(args);
    }
    const cmd = this.dispatcher.get(name);
    if (cmd === undefined) return errorOutcome('CommandNotFound', `The command ${name} has not been found`);
    if (oob && !cmd.allowOob) return errorOutcome('GenericError', `The command ${name} does not support OOB`);
    return this.dispatcher.invoke(name, args, { clientId: this.clientId, oob });
  }

  private negotiate(args: Record<string, unknown>): QmpOutcome {
    const cmd = this.dispatcher.get('qmp_capabilities')!;
    const problem = validateArgs(cmd.args, args);
    if (problem !== undefined) return errorOutcome('GenericError', problem);
    const enable = (args.enable ?? []) as string[];
    this.oob = enable.includes('oob');
    this.stateValue = 'ready';
    return { return: {} };
  }
}
