/** Helpers for tests of the service front end (src/net/frontend.ts) with real sockets on loopback. */
import type net from 'node:net';
import { FrontEnd } from '../../src/net/frontend.js';
import type { NicInput } from '../../src/net/nic.js';

/**
 * A FrontEnd listening on a free port of 127.0.0.1, numbering from 0, its guest input collected
 * in `events`; `connectionsMax` and `closedLingerMs` as the constructor's (its defaults when not
 * given). After the test the sockets in `clients` are destroyed, then the front end is closed.
 * `opens()`: the connection ids of the open events so far.
 */
export async function listeningFrontEnd(
  t: { after(fn: () => unknown): void },
  connectionsMax?: number,
  closedLingerMs?: number,
): Promise<{ fe: FrontEnd; events: NicInput[]; clients: net.Socket[]; opens: () => number[] }> {
  const events: NicInput[] = [];
  const fe = new FrontEnd({ host: '127.0.0.1', port: 0 }, (ev) => events.push(ev), { seq: 0, conn: 0 }, connectionsMax, closedLingerMs);
  await fe.listen();
  const clients: net.Socket[] = [];
  t.after(async () => {
    for (const s of clients) s.destroy();
    await fe.close();
  });
  const opens = (): number[] => events.filter((e) => e.kind === 'open').map((e) => e.conn);
  return { fe, events, clients, opens };
}
