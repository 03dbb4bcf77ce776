/**
 * `npm run bench`: runs every benchmark module in turn and prints its tables. Each module
 * measures its own baseline in the same run and prints ratios, so the numbers mean the same
 * thing on any machine. `npm run bench -- NAME...` runs only the named modules.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const modules = ['machine', 'migration', 'colo'];

async function main(): Promise<void> {
  const only = process.argv.slice(2);
  const here = path.dirname(fileURLToPath(import.meta.url));
  for (const name of modules) {
    if (only.length > 0 && !only.includes(name)) continue;
    const file = path.join(here, `${name}.js`);
    if (!fs.existsSync(file)) continue;
    const mod = (await import(file)) as { run(): Promise<void> };
    process.stdout.write(`\n## ${name}\n\n`);
    await mod.run();
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exitCode = 1;
});
