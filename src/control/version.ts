/** colo-vm's version, read once from the package.json of the installed package. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

let cached: string | undefined;

/** The "version" of colo-vm's package.json ("0.0.0" if it cannot be found). */
export function coloVersion(): string {
  if (cached !== undefined) return cached;
  cached = '0.0.0';
  // dist/src/control/version.js and src/control/version.ts both sit a few levels below it.
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    try {
      const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: unknown; version?: unknown };
      if (pkg.name === 'colo-vm' && typeof pkg.version === 'string') {
        cached = pkg.version;
        break;
      }
    } catch {
      // not here: look one level up
    }
    const up = path.dirname(dir);
    if (up === dir) break;
    dir = up;
  }
  return cached;
}

export interface VersionTriple {
  major: number;
  minor: number;
  micro: number;
}

/** "1.2.3-rc1" → {major: 1, minor: 2, micro: 3}; missing or odd parts count as 0. */
export function versionTriple(version: string): VersionTriple {
  const [major, minor, micro] = version.split(/[.+-]/, 3).map((p) => (/^[0-9]+$/.test(p) ? Number(p) : 0));
  return { major: major ?? 0, minor: minor ?? 0, micro: micro ?? 0 };
}
