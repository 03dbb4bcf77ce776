/**
 * One-line logs on stderr: `<iso time> <node> <level> <component>: <message>`.
 * Levels mean something: `error` is a real fault (a passing run has none); expected events
 * such as a failover closing its channels are `info` or `debug`. COLO_LOG=debug|info|warn|error
 * sets the threshold (default info).
 */
export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
const order: Record<LogLevel, number> = { debug: 0, info: 1, warn: 2, error: 3 };

let threshold: LogLevel = parseLevel(process.env.COLO_LOG);
let nodeName = 'colo';

function parseLevel(s: string | undefined): LogLevel {
  return s === 'debug' || s === 'info' || s === 'warn' || s === 'error' ? s : 'info';
}

/**
 * Whether stderr still takes lines. Its reader may go away (`2>&1 | tee log`, and tee is
 * killed; colo up's children share its stderr, and outlive it when it dies): an unhandled
 * 'error' (EPIPE) would end the process at its next line, turning a lost log reader into a
 * lost VM, or both of a pair. The lines are dropped from then on; the process goes on.
 */
let stderrOpen = true;
process.stderr.on('error', () => {
  stderrOpen = false;
});

export function setLogNode(name: string): void {
  nodeName = name;
}

export function setLogLevel(level: LogLevel): void {
  threshold = level;
}

export interface Logger {
  debug(msg: string): void;
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
  /** Whether a line at this level would be written (to skip building costly messages). */
  enabled(level: LogLevel): boolean;
}

export function logger(component: string): Logger {
  const at = (level: LogLevel) => (msg: string): void => {
    if (order[level] < order[threshold] || !stderrOpen) return;
    process.stderr.write(`${new Date().toISOString()} ${nodeName} ${level} ${component}: ${msg}\n`);
  };
  return { debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error'), enabled: (level) => order[level] >= order[threshold] };
}
