/**
 * A scripted migration destination for tests of the source: a TCP server on loopback that
 * sends the stream's preamble to each connection, decodes the source's frames and hands each
 * to `onFrame` with a way to reply. Sockets and server are closed at the test's cleanup.
 */
import net from 'node:net';
import { encodePreamble, FrameDecoder, FrameEncoder, FrameType, type Frame } from '../../src/migration/stream.js';
import type { TestEnv } from './harness.js';

export interface FakeConnection {
  readonly socket: net.Socket;
  /** Send a `reply` frame (JSON: {kind: ready | error | ...}). */
  reply(message: Record<string, unknown>): void;
}

/** The `ready` reply of a destination with no disk and no multifd channels, plus `extra`. */
export const plainReady = (extra: Record<string, unknown> = {}): Record<string, unknown> => ({ kind: 'ready', channelPorts: [], disk: 'none', ...extra });

export async function fakeDestination(
  env: TestEnv,
  onFrame: (f: Frame, c: FakeConnection) => void,
  onConnect?: (c: FakeConnection) => void,
): Promise<{ port: number; server: net.Server }> {
  const sockets: net.Socket[] = [];
  const server = net.createServer((socket) => {
    sockets.push(socket);
    socket.on('error', () => undefined);
    const decoder = new FrameDecoder();
    const encoder = new FrameEncoder();
    const c: FakeConnection = {
      socket,
      reply: (message) => {
        for (const b of encoder.json(FrameType.reply, message)) socket.write(b);
      },
    };
    onConnect?.(c);
    socket.write(encodePreamble());
    socket.on('data', (chunk: Buffer) => {
      decoder.push(chunk);
      for (let f = decoder.next(); f !== null; f = decoder.next()) {
        onFrame(f, c);
        if (socket.destroyed || socket.writableEnded) return;
      }
    });
  });
  env.onCleanup(() => {
    for (const s of sockets) s.destroy();
    server.close();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const a = server.address();
  return { port: typeof a === 'object' && a !== null ? a.port : 0, server };
}
