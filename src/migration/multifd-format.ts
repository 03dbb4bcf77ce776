import zlib from 'node:zlib';
import { limits } from '../core/limits.js';
import { StreamError } from '../core/errors.js';
import { Fl64 } from './checksum.js';

/**
 * The multifd channel wire format (docs/migration-protocol.md, "Multifd channels"). Pure:
 * encoders write into a caller's buffer, decoders read from one and throw StreamError.
 * Little-endian throughout (the main channel's frames are big-endian; these headers sit on
 * the hot path next to Uint32Array views of the same bytes).
 *
 *   channel hello  (source → destination, 48 bytes)
 *     0 magic "CMFD" | 4 version u16 | 6 flags u16 (0) | 8 migration id (16 bytes)
 *     24 channel u16 | 26 channel count u16 | 28 reserved (16 bytes, 0) | 44 crc32 of 0..44
 *   channel answer (destination → source, 16 bytes)
 *     0 magic "CMFA" | 4 version u16 | 6 status u16 | 8 reserved u32 (0) | 12 crc32 of 0..12
 *   packet header  (source → destination, 64 bytes)
 *     0 magic "CMFP" | 4 version u16 | 6 flags u16 (SYNC = 1) | 8 channel u16 | 10 reserved u16
 *     12 packet number u32 (per channel, from 0) | 16 round u32 | 20 normal pages u32
 *     24 zero pages u32 | 28 payload bytes u32 | 32 fl64 of the page numbers u64
 *     40 fl64 of the page data u64 | 48 reserved (12 bytes) | 60 crc32 of 0..60
 *   payload: page numbers (u32 each, the normal pages first, then the zero pages), then the
 *     normal pages' data, 4096 bytes each. The numbers are checked before any data is read,
 *     so a receiver knows where the data goes (and can read it straight into place).
 */
export const multifdVersion = 1;
export const channelHelloBytes = 48;
export const channelAnswerBytes = 16;
export const packetHeaderBytes = 64;
export const migrationIdBytes = 16;

const magicHello = 0x44464d43; // "CMFD"
const magicAnswer = 0x41464d43; // "CMFA"
const magicPacket = 0x50464d43; // "CMFP"

export const PacketFlags = { sync: 1 } as const;
const knownPacketFlags = PacketFlags.sync;

/** Why a destination refused a channel. */
export const ChannelStatus = {
  accepted: 0,
  wrongMigration: 1,
  badChannel: 2,
  badVersion: 3,
  duplicate: 4,
} as const;
export type ChannelStatusCode = (typeof ChannelStatus)[keyof typeof ChannelStatus];

const statusText: Record<number, string> = {
  [ChannelStatus.accepted]: 'accepted',
  [ChannelStatus.wrongMigration]: 'the channel belongs to another migration',
  [ChannelStatus.badChannel]: 'no such channel number',
  [ChannelStatus.badVersion]: 'unsupported multifd version',
  [ChannelStatus.duplicate]: 'the channel is already connected',
};

export function channelStatusText(status: number): string {
  return statusText[status] ?? `unknown status ${status}`;
}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

function crcOf(b: Uint8Array, end: number): number {
  return zlib.crc32(b.subarray(0, end)) >>> 0;
}

export interface ChannelHello {
  version: number;
  migrationId: Uint8Array;
  channel: number;
  channels: number;
}

export function encodeChannelHello(h: ChannelHello): Buffer {
  const b = Buffer.alloc(channelHelloBytes);
  const dv = view(b);
  dv.setUint32(0, magicHello, true);
  dv.setUint16(4, h.version, true);
  dv.setUint16(6, 0, true);
  b.set(h.migrationId.subarray(0, migrationIdBytes), 8);
  dv.setUint16(24, h.channel, true);
  dv.setUint16(26, h.channels, true);
  dv.setUint32(44, crcOf(b, 44), true);
  return b;
}

export function decodeChannelHello(b: Uint8Array): ChannelHello {
  if (b.byteLength < channelHelloBytes) throw new StreamError('STREAM_TRUNCATED', 'multifd channel hello is truncated');
  const dv = view(b);
  if (dv.getUint32(0, true) !== magicHello) throw new StreamError('STREAM_MAGIC', 'not a colo-vm multifd channel (bad magic)');
  if (dv.getUint32(44, true) !== crcOf(b, 44)) throw new StreamError('FRAME_CHECKSUM', 'multifd channel hello: checksum mismatch');
  return {
    version: dv.getUint16(4, true),
    migrationId: Uint8Array.from(b.subarray(8, 8 + migrationIdBytes)),
    channel: dv.getUint16(24, true),
    channels: dv.getUint16(26, true),
  };
}

export function encodeChannelAnswer(status: ChannelStatusCode): Buffer {
  const b = Buffer.alloc(channelAnswerBytes);
  const dv = view(b);
  dv.setUint32(0, magicAnswer, true);
  dv.setUint16(4, multifdVersion, true);
  dv.setUint16(6, status, true);
  dv.setUint32(12, crcOf(b, 12), true);
  return b;
}

export function decodeChannelAnswer(b: Uint8Array): number {
  if (b.byteLength < channelAnswerBytes) throw new StreamError('STREAM_TRUNCATED', 'multifd channel answer is truncated');
  const dv = view(b);
  if (dv.getUint32(0, true) !== magicAnswer) throw new StreamError('STREAM_MAGIC', 'multifd channel answer: bad magic');
  if (dv.getUint32(12, true) !== crcOf(b, 12)) throw new StreamError('FRAME_CHECKSUM', 'multifd channel answer: checksum mismatch');
  return dv.getUint16(6, true);
}

export interface PacketHeader {
  flags: number;
  channel: number;
  packet: number;
  round: number;
  normal: number;
  zero: number;
  payloadBytes: number;
  numbersChecksum: bigint;
  dataChecksum: bigint;
}

export function payloadBytesOf(normal: number, zero: number): number {
  return 4 * (normal + zero) + limits.pageBytes * normal;
}

/** Bytes of the largest page-number list (normal and zero pages of one packet). */
export const numbersBytesMax = 4 * (limits.pagesPerPacketMax + limits.multifdZeroPagesPerPacketMax);

/**
 * A staging slot: header and numbers, then the data at a fixed offset (so a sender can copy
 * pages before it knows how many zero pages the packet will also name).
 */
export const slotDataOffset = Math.ceil((packetHeaderBytes + numbersBytesMax) / 4096) * 4096;
export const slotBytes = slotDataOffset + limits.pagesPerPacketMax * limits.pageBytes;

/** Write a header at `b[at..at+64)`. */
export function encodePacketHeader(b: Uint8Array, at: number, h: PacketHeader): void {
  const dv = new DataView(b.buffer, b.byteOffset + at, packetHeaderBytes);
  dv.setUint32(0, magicPacket, true);
  dv.setUint16(4, multifdVersion, true);
  dv.setUint16(6, h.flags, true);
  dv.setUint16(8, h.channel, true);
  dv.setUint16(10, 0, true);
  dv.setUint32(12, h.packet >>> 0, true);
  dv.setUint32(16, h.round >>> 0, true);
  dv.setUint32(20, h.normal, true);
  dv.setUint32(24, h.zero, true);
  dv.setUint32(28, h.payloadBytes, true);
  dv.setBigUint64(32, h.numbersChecksum, true);
  dv.setBigUint64(40, h.dataChecksum, true);
  for (let i = 48; i < 60; i += 4) dv.setUint32(i, 0, true);
  dv.setUint32(60, zlib.crc32(b.subarray(at, at + 60)) >>> 0, true);
}

/**
 * Read and check a header at `b[at..at+64)`: magic, version, checksum, flags, counts against
 * the limits, and the payload length they imply — all before the payload is read.
 */
export function decodePacketHeader(b: Uint8Array, at: number): PacketHeader {
  const dv = new DataView(b.buffer, b.byteOffset + at, packetHeaderBytes);
  if (dv.getUint32(0, true) !== magicPacket) throw new StreamError('STREAM_MAGIC', 'multifd packet: bad magic (corrupted or misaligned channel)');
  if ((zlib.crc32(b.subarray(at, at + 60)) >>> 0) !== dv.getUint32(60, true)) {
    throw new StreamError('FRAME_CHECKSUM', 'multifd packet header: checksum mismatch (corrupted stream)');
  }
  const version = dv.getUint16(4, true);
  if (version !== multifdVersion) throw new StreamError('STREAM_VERSION', `multifd packet version ${version} is not supported (this build speaks ${multifdVersion})`);
  const flags = dv.getUint16(6, true);
  if ((flags & ~knownPacketFlags) !== 0) throw new StreamError('FRAME_INVALID', `multifd packet: unknown flags 0x${flags.toString(16)}`);
  const h: PacketHeader = {
    flags,
    channel: dv.getUint16(8, true),
    packet: dv.getUint32(12, true),
    round: dv.getUint32(16, true),
    normal: dv.getUint32(20, true),
    zero: dv.getUint32(24, true),
    payloadBytes: dv.getUint32(28, true),
    numbersChecksum: dv.getBigUint64(32, true),
    dataChecksum: dv.getBigUint64(40, true),
  };
  if (h.normal > limits.pagesPerPacketMax) {
    throw new StreamError('FRAME_TOO_LARGE', `multifd packet of ${h.normal} pages exceeds the limit of ${limits.pagesPerPacketMax}`);
  }
  if (h.zero > limits.multifdZeroPagesPerPacketMax) {
    throw new StreamError('FRAME_TOO_LARGE', `multifd packet of ${h.zero} zero pages exceeds the limit of ${limits.multifdZeroPagesPerPacketMax}`);
  }
  if (h.payloadBytes !== payloadBytesOf(h.normal, h.zero)) {
    throw new StreamError('FRAME_INVALID', `multifd packet ${h.packet}: ${h.normal} pages and ${h.zero} zero pages need ${payloadBytesOf(h.normal, h.zero)} payload bytes, the header says ${h.payloadBytes}`);
  }
  if ((h.flags & PacketFlags.sync) !== 0 && h.normal + h.zero !== 0) {
    throw new StreamError('FRAME_INVALID', `multifd packet ${h.packet}: a SYNC packet carries no pages`);
  }
  return h;
}

export function migrationIdHex(id: Uint8Array): string {
  return Buffer.from(id.buffer, id.byteOffset, id.byteLength).toString('hex');
}

export function parseMigrationId(hex: unknown): Uint8Array {
  if (typeof hex !== 'string' || !/^[0-9a-f]{32}$/.test(hex)) throw new StreamError('FRAME_INVALID', 'hello: migrationId must be 32 hex digits');
  return Uint8Array.from(Buffer.from(hex, 'hex'));
}

/**
 * One whole packet in a new buffer: header, `numbers` (the first `normal` are the pages whose
 * 4096 bytes each follow in `data`), data, with both fl64 sums. For tests and the receive
 * worker's warm-up; the send worker builds packets in place in its staging memory.
 */
export function encodePacket(
  h: { flags: number; channel: number; packet: number; round: number },
  numbers: readonly number[],
  normal: number,
  data: Uint8Array,
  fl64?: WebAssembly.Module,
): Buffer {
  const nb = Buffer.alloc(4 * numbers.length);
  numbers.forEach((p, i) => nb.writeUInt32LE(p, 4 * i));
  const sum = new Fl64(nb.byteLength + data.byteLength + 64, fl64);
  sum.buffer().set(nb, 0);
  sum.buffer().set(data, nb.byteLength);
  const header = Buffer.alloc(packetHeaderBytes);
  encodePacketHeader(header, 0, {
    ...h,
    normal,
    zero: numbers.length - normal,
    payloadBytes: payloadBytesOf(normal, numbers.length - normal),
    numbersChecksum: sum.sum(0, nb.byteLength),
    dataChecksum: sum.sum(nb.byteLength, data.byteLength),
  });
  return Buffer.concat([header, nb, data]);
}
