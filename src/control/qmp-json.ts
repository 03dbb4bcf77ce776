/**
 * The JSON dialect of QMP.
 *
 * Input: RFC 8259 JSON plus QEMU's extension of single-quoted strings (QEMU's own COLO
 * documentation writes `{'execute': 'migrate', ...}`), with a nesting bound and duplicate keys
 * refused. Output: QEMU's layout (`{"return": {}, "id": 1}`: ", " and ": " separators) in pure
 * ASCII (anything else is written as \uXXXX), one object per line ending in CRLF.
 */

export class JsonSyntaxError extends Error {
  override name = 'JsonSyntaxError';
}

/**
 * An integer literal beyond 2^53, kept as written: QEMU parses such integers (int64, uint64)
 * exactly and echoes an `id` byte for byte, where a double would come back as another number
 * (9007199254740993 as 9007199254740992) and the client would never see its reply.
 * encodeQmpJson writes it back as it was read.
 */
export class QmpExactInteger {
  constructor(readonly text: string) {}
  toNumber(): number {
    return Number(this.text);
  }
}

export interface ParseOptions {
  /** Integer literals beyond the safe range come back as QmpExactInteger (default: numbers). */
  exactIntegers?: boolean;
}

/** Parses one QMP JSON text. Throws JsonSyntaxError whose message fits after "JSON parse error, ". */
export function parseQmpJson(text: string, depthMax: number, options: ParseOptions = {}): unknown {
  const parser = new Parser(text, depthMax, options.exactIntegers === true);
  parser.skipSpace();
  const value = parser.value(0);
  parser.skipSpace();
  if (parser.at < text.length) parser.fail('unexpected text after the value');
  return value;
}

class Parser {
  at = 0;
  constructor(
    private readonly text: string,
    private readonly depthMax: number,
    private readonly exactIntegers: boolean,
  ) {}

  fail(what: string): never {
    throw new JsonSyntaxError(`${what} at offset ${this.at}`);
  }

  skipSpace(): void {
    const t = this.text;
    while (this.at < t.length) {
      const c = t.charCodeAt(this.at);
      if (c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d) this.at++;
      else break;
    }
  }

  value(depth: number): unknown {
    const t = this.text;
    if (this.at >= t.length) this.fail('expecting a value but the input ended');
    const c = t[this.at]!;
    if (c === '{') return this.object(depth + 1);
    if (c === '[') return this.array(depth + 1);
    if (c === '"' || c === "'") return this.string();
    if (c === '-' || (c >= '0' && c <= '9')) return this.number();
    const word = /^[A-Za-z_][A-Za-z0-9_]*/.exec(t.slice(this.at, this.at + 32));
    if (word !== null) {
      const w = word[0];
      if (w === 'true' || w === 'false' || w === 'null') {
        this.at += w.length;
        return w === 'true' ? true : w === 'false' ? false : null;
      }
      this.fail(`invalid keyword '${w}'`);
    }
    this.fail(`unexpected character '${printable(c)}'`);
  }

  private enter(depth: number): void {
    if (depth > this.depthMax) this.fail(`nesting deeper than ${this.depthMax} levels`);
  }

  private object(depth: number): Record<string, unknown> {
    this.enter(depth);
    this.at++; // {
    const out: Record<string, unknown> = {};
    const seen = new Set<string>();
    this.skipSpace();
    if (this.text[this.at] === '}') {
      this.at++;
      return out;
    }
    for (;;) {
      this.skipSpace();
      const q = this.text[this.at];
      if (q !== '"' && q !== "'") this.fail('expecting a string key in an object');
      const key = this.string();
      if (seen.has(key)) this.fail(`duplicate key '${key}'`);
      seen.add(key);
      this.skipSpace();
      if (this.text[this.at] !== ':') this.fail("expecting ':' after an object key");
      this.at++;
      this.skipSpace();
      const v = this.value(depth);
      // defineProperty so that a key named "__proto__" stays an ordinary member.
      Object.defineProperty(out, key, { value: v, enumerable: true, writable: true, configurable: true });
      this.skipSpace();
      const sep = this.text[this.at];
      if (sep === ',') {
        this.at++;
        continue;
      }
      if (sep === '}') {
        this.at++;
        return out;
      }
      this.fail(sep === undefined ? "expecting ',' or '}' but the input ended" : "expecting ',' or '}' in an object");
    }
  }

  private array(depth: number): unknown[] {
    this.enter(depth);
    this.at++; // [
    const out: unknown[] = [];
    this.skipSpace();
    if (this.text[this.at] === ']') {
      this.at++;
      return out;
    }
    for (;;) {
      this.skipSpace();
      out.push(this.value(depth));
      this.skipSpace();
      const sep = this.text[this.at];
      if (sep === ',') {
        this.at++;
        continue;
      }
      if (sep === ']') {
        this.at++;
        return out;
      }
      this.fail(sep === undefined ? "expecting ',' or ']' but the input ended" : "expecting ',' or ']' in an array");
    }
  }

  private string(): string {
    const t = this.text;
    const quote = t[this.at]!;
    this.at++;
    let out = '';
    let runStart = this.at;
    for (;;) {
      if (this.at >= t.length) this.fail('unterminated string');
      const c = t.charCodeAt(this.at);
      if (c === quote.charCodeAt(0)) {
        out += t.slice(runStart, this.at);
        this.at++;
        return out;
      }
      if (c < 0x20) this.fail('control character in a string');
      if (c !== 0x5c) {
        this.at++;
        continue;
      }
      out += t.slice(runStart, this.at);
      const e = t[this.at + 1];
      this.at += 2;
      switch (e) {
        case '"':
        case "'":
        case '\\':
        case '/':
          out += e;
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          const unit = this.hex4(this.at);
          const escapeAt = this.at - 2;
          this.at += 4;
          if (unit >= 0xd800 && unit <= 0xdfff) {
            // Only a leading surrogate followed by an escaped trailing one is a character. A lone
            // one cannot be encoded as UTF-8: QEMU refuses it, where a JS string would carry it on
            // and turn it into U+FFFD in a file name or a URI (a file written under another name).
            const trailing = unit <= 0xdbff && t.startsWith('\\u', this.at) ? this.hex4(this.at + 2, true) : -1;
            if (trailing < 0xdc00 || trailing > 0xdfff) {
              this.at = escapeAt;
              this.fail(`${t.slice(escapeAt, escapeAt + 6)} is not a valid Unicode character`);
            }
            out += String.fromCharCode(unit, trailing);
            this.at += 6;
            break;
          }
          out += String.fromCharCode(unit);
          break;
        }
        default:
          this.at -= 2;
          this.fail(e === undefined ? 'unterminated string' : `invalid escape '\\${printable(e)}' in a string`);
      }
      runStart = this.at;
    }
  }

  /** The 4 hex digits at `at` (a \u escape's); -1 if they are not when `lenient`, else a syntax error. */
  private hex4(at: number, lenient = false): number {
    const hex = this.text.slice(at, at + 4);
    if (/^[0-9A-Fa-f]{4}$/.test(hex)) return parseInt(hex, 16);
    if (lenient) return -1;
    this.fail('invalid \\u escape in a string');
  }

  private number(): number | QmpExactInteger {
    const m = /^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/.exec(this.text.slice(this.at, this.at + 400));
    if (m === null) this.fail('invalid number');
    const n = Number(m[0]);
    if (!Number.isFinite(n)) this.fail(`number ${m[0]} is out of range`);
    this.at += m[0].length;
    const next = this.text[this.at];
    if (next !== undefined && /[0-9A-Za-z_.]/.test(next)) this.fail('invalid number');
    if (this.exactIntegers && !Number.isSafeInteger(n) && /^-?[0-9]+$/.test(m[0])) return new QmpExactInteger(m[0]);
    return n;
  }
}

function printable(c: string): string {
  const code = c.charCodeAt(0);
  return code < 0x20 || code > 0x7e ? `\\u${code.toString(16).padStart(4, '0')}` : c;
}

/** Nesting bound of encodeQmpJson: deeper (or cyclic) values are refused, not overflowed. */
const encodeDepthMax = 4096;

/** Encodes `value` in QEMU's layout, ASCII only. Throws TypeError for what JSON cannot carry. */
export function encodeQmpJson(value: unknown): string {
  const out: string[] = [];
  encode(value, out, 0);
  return out.join('');
}

function encode(value: unknown, out: string[], depth: number): void {
  if (depth > encodeDepthMax) throw new TypeError(`value nested deeper than ${encodeDepthMax} levels (or cyclic)`);
  switch (typeof value) {
    case 'string':
      out.push(quoteAscii(value));
      return;
    case 'number':
      if (!Number.isFinite(value)) throw new TypeError(`cannot encode the number ${value}`);
      out.push(String(value));
      return;
    case 'boolean':
      out.push(value ? 'true' : 'false');
      return;
    case 'object': {
      if (value === null) {
        out.push('null');
        return;
      }
      if (value instanceof QmpExactInteger) {
        out.push(value.text);
        return;
      }
      if (Array.isArray(value)) {
        out.push('[');
        value.forEach((item, i) => {
          if (i > 0) out.push(', ');
          if (item === undefined || typeof item === 'function' || typeof item === 'symbol') out.push('null');
          else encode(item, out, depth + 1);
        });
        out.push(']');
        return;
      }
      const toJSON = (value as { toJSON?: unknown }).toJSON;
      if (typeof toJSON === 'function') {
        encode((toJSON as () => unknown).call(value), out, depth + 1);
        return;
      }
      out.push('{');
      let first = true;
      for (const key of Object.keys(value)) {
        const v = (value as Record<string, unknown>)[key];
        if (v === undefined || typeof v === 'function' || typeof v === 'symbol') continue;
        if (!first) out.push(', ');
        first = false;
        out.push(quoteAscii(key), ': ');
        encode(v, out, depth + 1);
      }
      out.push('}');
      return;
    }
    default:
      throw new TypeError(`cannot encode a value of type ${typeof value}`);
  }
}

function quoteAscii(s: string): string {
  return JSON.stringify(s).replace(/[\u007f-\uffff]/g, (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0'));
}

export const lineTooLong: unique symbol = Symbol('lineTooLong');

/**
 * Splits a byte stream into lines ("\n"-terminated, the "\n" removed) without copying a chunk
 * more than once, and reports a line longer than `lineBytesMax` as soon as it is seen.
 * Lines are pulled with shift(), so a reader that is busy can leave input unsplit.
 */
export class LineBuffer {
  private backlog: Buffer[] = [];
  private partial: Buffer[] = [];
  private partialBytes = 0;
  private unsplitBytes = 0;

  constructor(readonly lineBytesMax: number) {}

  push(chunk: Uint8Array): void {
    if (chunk.byteLength === 0) return;
    const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    this.backlog.push(buf);
    this.unsplitBytes += buf.byteLength;
  }

  /** Bytes received and not yet returned as lines. */
  get bufferedBytes(): number {
    return this.unsplitBytes + this.partialBytes;
  }

  /** The next complete line, undefined when no complete line is buffered, or lineTooLong. */
  shift(): Buffer | undefined | typeof lineTooLong {
    while (this.backlog.length > 0) {
      const chunk = this.backlog[0]!;
      const nl = chunk.indexOf(0x0a);
      if (nl < 0) {
        this.backlog.shift();
        this.unsplitBytes -= chunk.byteLength;
        this.partial.push(chunk);
        this.partialBytes += chunk.byteLength;
        if (this.partialBytes > this.lineBytesMax) return lineTooLong;
        continue;
      }
      if (this.partialBytes + nl > this.lineBytesMax) return lineTooLong;
      const tail = chunk.subarray(0, nl);
      const line = this.partial.length === 0 ? tail : Buffer.concat([...this.partial, tail]);
      this.partial = [];
      this.partialBytes = 0;
      this.unsplitBytes -= nl + 1;
      if (nl + 1 === chunk.byteLength) this.backlog.shift();
      else this.backlog[0] = chunk.subarray(nl + 1);
      return line;
    }
    return undefined;
  }

  /** At end of input: the unterminated last line, if any (call after shift() returned undefined). */
  takeRest(): Buffer | undefined | typeof lineTooLong {
    if (this.partialBytes === 0) return undefined;
    if (this.partialBytes > this.lineBytesMax) return lineTooLong;
    const rest = Buffer.concat(this.partial);
    this.partial = [];
    this.partialBytes = 0;
    return rest;
  }
}

/**
 * Splits QMP server input into messages the way QEMU's json-streamer does for a client that
 * sends one value after the other: a message ends at a newline, as with LineBuffer, or as
 * soon as the bracket that closes its top-level object or array arrives, so that a client
 * that sends `{"execute": ...}` without a newline (QEMU's legacy Python client) is answered,
 * and two objects back to back are two messages. Brackets inside strings ("..." and QEMU's
 * '...', with backslash escapes) do not count. A newline inside an open object or array is
 * white space, so a pretty-printed command spanning lines is one message (QEMU's lexer takes
 * it as white space too); a newline anywhere else (top level, inside a string) ends the
 * message and resets the scan, so malformed input is cut and answered there; so does a control
 * byte (not tab or CR) or 0xFE/0xFF, anywhere (QEMU's documented parser reset). The scan state is
 * kept between chunks: every byte is looked at once. Bytes of a message beyond
 * `lineBytesMax` are reported as lineTooLong as soon as they are seen.
 */
export class JsonMessageBuffer {
  /** Received and not yet returned; the current message starts at `start` in chunks[0]. */
  private chunks: Buffer[] = [];
  private start = 0;
  /** The next byte to scan: chunks[scanChunk][scanAt]. */
  private scanChunk = 0;
  private scanAt = 0;
  private buffered = 0;
  /** Bytes of the current message scanned so far. */
  private messageBytes = 0;
  private depth = 0;
  /** The quote that opened the string the scan is in (0: not in a string). */
  private quote = 0;
  private escaped = false;

  constructor(readonly lineBytesMax: number) {}

  push(chunk: Uint8Array): void {
    if (chunk.byteLength === 0) return;
    this.chunks.push(Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
    this.buffered += chunk.byteLength;
  }

  /** Bytes received and not yet returned as messages. */
  get bufferedBytes(): number {
    return this.buffered;
  }

  /** The next complete message, undefined when none is buffered yet, or lineTooLong. */
  shift(): Buffer | undefined | typeof lineTooLong {
    while (this.scanChunk < this.chunks.length) {
      const chunk = this.chunks[this.scanChunk]!;
      while (this.scanAt < chunk.byteLength) {
        const at = this.scanAt++;
        const c = chunk[at]!;
        // A newline inside an object or array is white space (a message may span lines, as in
        // QEMU); elsewhere, and inside a string (where QEMU's lexer refuses it), it ends the message.
        if (c === 0x0a && (this.depth === 0 || this.quote !== 0)) return this.cut(at, 1);
        this.messageBytes++;
        if (this.messageBytes > this.lineBytesMax) return lineTooLong;
        // A control byte other than tab, CR and LF, or 0xFE/0xFF (never in UTF-8), is a lexical
        // error anywhere, in a string too: QEMU's lexer answers it and resets, and its QMP spec
        // tells clients to send one to get an unclosed object's parser back to a known state.
        // It ends the message, which fails to parse and is answered; the scan starts afresh.
        if ((c < 0x20 && c !== 0x09 && c !== 0x0a && c !== 0x0d) || c >= 0xfe) return this.cut(at + 1, 0);
        if (this.quote !== 0) {
          if (this.escaped) this.escaped = false;
          else if (c === 0x5c) this.escaped = true;
          else if (c === this.quote) this.quote = 0;
        } else if (c === 0x22 || c === 0x27) {
          this.quote = c;
        } else if (c === 0x7b || c === 0x5b) {
          this.depth++;
        } else if ((c === 0x7d || c === 0x5d) && this.depth > 0) {
          // A stray closing bracket at depth 0 stays in the message (a parse error at its newline).
          this.depth--;
          if (this.depth === 0) return this.cut(at + 1, 0);
        }
      }
      this.scanChunk++;
      this.scanAt = 0;
    }
    return undefined;
  }

  /** At end of input: the unterminated last message, if any (call after shift() returned undefined). */
  takeRest(): Buffer | undefined | typeof lineTooLong {
    if (this.buffered === 0) return undefined;
    if (this.buffered > this.lineBytesMax) return lineTooLong;
    const parts = this.chunks.map((c, i) => (i === 0 ? c.subarray(this.start) : c));
    const rest = parts.length === 1 ? parts[0]! : Buffer.concat(parts);
    this.chunks = [];
    this.start = 0;
    this.scanChunk = 0;
    this.scanAt = 0;
    this.resetScan();
    this.buffered = 0;
    return rest;
  }

  /**
   * The message from `start` up to `end` in chunks[scanChunk] (exclusive); `skip` bytes after
   * it (the newline) are dropped. The scan goes on after them.
   */
  private cut(end: number, skip: number): Buffer {
    const last = this.scanChunk;
    const parts: Buffer[] = [];
    for (let i = 0; i <= last; i++) {
      const c = this.chunks[i]!;
      parts.push(c.subarray(i === 0 ? this.start : 0, i === last ? end : c.byteLength));
    }
    const message = parts.length === 1 ? parts[0]! : Buffer.concat(parts);
    const next = end + skip;
    this.buffered -= message.byteLength + skip;
    const rest = this.chunks[last]!;
    if (last > 0) this.chunks.splice(0, last);
    if (next >= rest.byteLength) {
      this.chunks.shift();
      this.start = 0;
    } else {
      this.start = next;
    }
    this.scanChunk = 0;
    this.scanAt = this.chunks.length === 0 ? 0 : this.start;
    this.resetScan();
    return message;
  }

  private resetScan(): void {
    this.messageBytes = 0;
    this.depth = 0;
    this.quote = 0;
    this.escaped = false;
  }
}

/** `value` with every QmpExactInteger in it turned into a number (command arguments). */
export function toPlainNumbers(value: unknown): unknown {
  if (value instanceof QmpExactInteger) return value.toNumber();
  if (Array.isArray(value)) return value.map(toPlainNumbers);
  if (value !== null && typeof value === 'object') {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) {
      Object.defineProperty(out, k, { value: toPlainNumbers(v), enumerable: true, writable: true, configurable: true });
    }
    return out;
  }
  return value;
}
