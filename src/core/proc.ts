import fs from 'node:fs';

/**
 * What /proc/PID/stat says of process `pid`: its state letter (field 3: 'Z' a zombie, 'X'
 * dead) and its start time (field 22, clock ticks since boot: with the pid, it names one
 * process, not whoever got the pid again). Null when it cannot be read (gone, no /proc).
 */
export function procStat(pid: number): { state: string; startTime: string | null } | null {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  // "PID (COMM) STATE ...": COMM may hold spaces and parentheses, so split after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { state: fields[0] ?? '', startTime: fields[19] ?? null };
}

/** A process that has ended but is not reaped yet (a zombie), or is being torn down. */
export function procEnded(state: string): boolean {
  return state === 'Z' || state === 'X';
}
