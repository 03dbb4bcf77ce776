/**
 * qmp-shell style commands for the CLI: `colo qmp ADDRESS COMMAND [key=value ...]`.
 *
 *   colo qmp unix:/run/vm.qmp query-status
 *   colo qmp unix:/run/vm.qmp migrate uri=tcp:10.0.0.2:4444
 *   colo qmp unix:/run/vm.qmp migrate-set-capabilities 'capabilities=[{"capability":"x-colo","state":true}]'
 *   colo qmp unix:/run/vm.qmp migrate-set-parameters x-checkpoint-delay=2000
 *   colo qmp unix:/run/vm.qmp '{"execute":"query-migrate"}'        (a whole request as JSON)
 *
 * Values are JSON when they parse as JSON (numbers, true/false, null, "quoted", objects,
 * arrays), else strings; True/False in any case are booleans, as in qmp-shell. Dotted keys
 * build nested objects: `a.b=1 a.c=x` → {"a": {"b": 1, "c": "x"}}.
 */
import { ColoError, QmpCommandError, UsageError, errorMessage } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { parseAddress } from './address.js';
import { QmpExactInteger, parseQmpJson } from './qmp-json.js';
import { QmpClient } from './qmp-client.js';

export interface ShellCommand {
  execute: string;
  arguments: Record<string, unknown>;
}

function syntax(message: string): UsageError {
  return new UsageError('QMP_SHELL_SYNTAX', message);
}

function isObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

/** A `key=value` value: JSON if it parses as JSON, True/False booleans, else the text itself. */
export function parseShellValue(text: string): unknown {
  const lower = text.toLowerCase();
  if (lower === 'true') return true;
  if (lower === 'false') return false;
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return text;
  }
  // Keep what JSON numbers cannot carry exactly as text rather than send something else.
  if (typeof value === 'number' && !Number.isFinite(value)) return text;
  refuseInexactIntegers(text);
  return value;
}

/**
 * JSON.parse turns an integer beyond 2^53 into a neighbouring double (9007199254740993 into
 * 9007199254740992), anywhere in a value: in an object or array too (a QEMU address or byte
 * count in a JSON argument or a whole request), sending another number than the one written.
 * Such a number is a UsageError instead.
 */
function refuseInexactIntegers(text: string): void {
  let exact: unknown;
  try {
    exact = parseQmpJson(text, limits.qmpJsonDepthMax, { exactIntegers: true });
  } catch {
    return; // JSON.parse took it; a dialect difference, not a number (JSON.parse's value is sent)
  }
  const find = (v: unknown): QmpExactInteger | null => {
    if (v instanceof QmpExactInteger) return v;
    if (v === null || typeof v !== 'object') return null;
    for (const x of Object.values(v)) {
      const hit = find(x);
      if (hit !== null) return hit;
    }
    return null;
  };
  const hit = find(exact);
  if (hit !== null) throw syntax(`the integer ${hit.text} is too large to be sent exactly (the limit is ${Number.MAX_SAFE_INTEGER})`);
}

/** Sets `value` at the dotted `key` of `target`, with qmp-shell's errors for conflicts. */
function setDotted(target: Record<string, unknown>, key: string, value: unknown): void {
  const path = key.split('.');
  if (path.some((p) => p === '')) throw syntax(`bad key '${key}': empty name between dots`);
  let node = target;
  for (let i = 0; i < path.length - 1; i++) {
    const part = path[i]!;
    const next = Object.hasOwn(node, part) ? node[part] : undefined;
    if (next === undefined) {
      const child: Record<string, unknown> = {};
      Object.defineProperty(node, part, { value: child, enumerable: true, writable: true, configurable: true });
      node = child;
    } else if (isObject(next)) {
      node = next;
    } else {
      throw syntax(`Cannot use "${path.slice(0, i + 1).join('.')}" as both leaf and non-leaf key`);
    }
  }
  const leaf = path[path.length - 1]!;
  if (Object.hasOwn(node, leaf)) {
    if (isObject(node[leaf])) throw syntax(`Cannot use "${key}" as both leaf and non-leaf key`);
    throw syntax(`Cannot set "${key}" multiple times`);
  }
  Object.defineProperty(node, leaf, { value, enumerable: true, writable: true, configurable: true });
}

/**
 * `['migrate', 'uri=tcp:h:1']` → {execute: 'migrate', arguments: {uri: 'tcp:h:1'}}.
 * A single word starting with `{` is a whole request: {"execute": ..., "arguments": ...}.
 * Bad input is a UsageError.
 */
export function parseShellCommand(words: readonly string[]): ShellCommand {
  if (words.length === 0) throw syntax('missing QMP command (e.g. query-status)');
  const first = words[0]!;
  if (first.trimStart().startsWith('{')) {
    if (words.length > 1) throw syntax('a JSON request must be a single argument (quote it)');
    let request: unknown;
    try {
      request = JSON.parse(first);
    } catch (err) {
      throw syntax(`the request is not valid JSON: ${errorMessage(err)}`);
    }
    refuseInexactIntegers(first);
    if (!isObject(request) || typeof request.execute !== 'string') {
      throw syntax('a JSON request needs an "execute" member with the command name');
    }
    for (const key of Object.keys(request)) {
      if (key !== 'execute' && key !== 'arguments' && key !== 'id') throw syntax(`unexpected member '${key}' in the JSON request`);
    }
    const args = request.arguments ?? {};
    if (!isObject(args)) throw syntax('"arguments" must be an object');
    return { execute: request.execute, arguments: args };
  }
  if (first.includes('=') || first.startsWith('-')) {
    throw syntax(`expected a QMP command name first, got '${first}'`);
  }
  const args: Record<string, unknown> = {};
  for (const word of words.slice(1)) {
    const eq = word.indexOf('=');
    if (eq < 0) throw syntax(`Expected a key=value pair, got '${word}'`);
    const key = word.slice(0, eq);
    if (key === '') throw syntax(`Expected a key=value pair, got '${word}' (empty key)`);
    setDotted(args, key, parseShellValue(word.slice(eq + 1)));
  }
  return { execute: first, arguments: args };
}

/**
 * A reply value as printed by `colo qmp`: indented JSON (JSON.stringify's layout), with an
 * integer beyond 2^53 (a QmpExactInteger: the client reads replies so) written as the server
 * sent it, not as the nearest double.
 */
export function formatReply(value: unknown): string {
  return formatJson(value === undefined ? {} : value, '');
}

function formatJson(v: unknown, indent: string): string {
  if (v instanceof QmpExactInteger) return v.text;
  if (v === null || typeof v !== 'object') return JSON.stringify(v) ?? 'null';
  const inner = indent + '  ';
  if (Array.isArray(v)) {
    if (v.length === 0) return '[]';
    return `[\n${v.map((x) => inner + formatJson(x, inner)).join(',\n')}\n${indent}]`;
  }
  const entries = Object.entries(v as Record<string, unknown>).filter(([, x]) => x !== undefined);
  if (entries.length === 0) return '{}';
  return `{\n${entries.map(([k, x]) => `${inner}${JSON.stringify(k)}: ${formatJson(x, inner)}`).join(',\n')}\n${indent}}`;
}

export interface TextSink {
  write(text: string): unknown;
}

export interface RunQmpOptions {
  /** Where errors go (default: `out`). */
  err?: TextSink;
  /** Connect and reply timeout each (default limits.qmpTimeoutMsDefault); the greeting has limits.qmpShellGreetingTimeoutMs of it. */
  timeoutMs?: number;
}

/**
 * Runs one command for the CLI: prints the `return` value (formatReply) and returns 0; an error
 * reply prints `error: <class>: <desc>` and returns 1; a connection failure or timeout prints
 * `error: <message>` and returns 1; a bad address or command line prints `error: <message>`
 * and returns 2.
 */
export async function runQmpCommand(
  address: string,
  words: readonly string[],
  out: TextSink,
  options: RunQmpOptions = {},
): Promise<number> {
  const err = options.err ?? out;
  let command: ShellCommand;
  try {
    parseAddress(address);
    command = parseShellCommand(words);
  } catch (e) {
    err.write(`error: ${errorMessage(e)}\n`);
    return 2;
  }
  const timing = options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs };
  let client: QmpClient;
  try {
    client = await QmpClient.connect(address, { ...timing, greetingTimeoutMs: limits.qmpShellGreetingTimeoutMs, exactIntegers: true });
  } catch (e) {
    if (e instanceof QmpCommandError) err.write(`error: ${e.errorClass}: ${e.message}\n`);
    else err.write(`error: ${errorMessage(e)}\n`);
    return 1;
  }
  try {
    const value = await client.execute(command.execute, command.arguments, timing);
    out.write(formatReply(value) + '\n');
    return 0;
  } catch (e) {
    if (e instanceof QmpCommandError) err.write(`error: ${e.errorClass}: ${e.message}\n`);
    else if (e instanceof ColoError) err.write(`error: ${e.message}\n`);
    else throw e;
    return 1;
  } finally {
    await client.close();
  }
}
