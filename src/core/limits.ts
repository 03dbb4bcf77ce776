/**
 * Every bound of colo-vm in one place (STYLE.md), named with the unit last.
 * Code that loops over input, allocates from a length it read, or queues things checks one
 * of these.
 */
const nicConnectionsMax = 1024;
const nicConnectionInputWindowBytes = 1024 * 1024;
const nicInputEventCharge = 1024;
/** Bytes one socket read hands the front end at most (libuv's read buffer). */
const socketReadBytesMax = 65536;

export const limits = {
  /** Guest page size used for dirty tracking, migration and checkpoints. */
  pageBytes: 4096,
  /** WebAssembly page size (memory.grow unit). */
  wasmPageBytes: 65536,
  /** Largest guest RAM accepted by --memory. */
  guestMemoryBytesMax: 4 * 1024 * 1024 * 1024 - 65536,
  /** Default guest RAM maximum when --memory is not given. */
  guestMemoryBytesDefault: 256 * 1024 * 1024,
  /** Largest guest module accepted. */
  guestModuleBytesMax: 64 * 1024 * 1024,
  /** Bytes of colo's region (right above the guest's pages, reserved-region.ts) for the asyncify unwind stack. */
  asyncifyStackBytes: 64 * 1024,
  /**
   * The longest wait for colo's reserved-region lock, which the vCPU holds while a memory.grow
   * moves the region and the main thread while it reads the dirty map: both take microseconds,
   * so running out of it means the other thread died holding the lock.
   */
  reservedRegionLockWaitMs: 5000,
  /**
   * The largest frame asyncify may save for one function (its locals and call index). The
   * last this many bytes of the asyncify area are kept beyond the end the guest's unwind is
   * allowed to reach: the frame that crosses that end is written there before its check traps
   * (instrument-walk.ts, boundAsyncifyStack). A guest with a bigger frame is refused at load;
   * wasi-libc guests such as kv.wasm save at most 192 bytes.
   */
  asyncifyFrameBytesMax: 4 * 1024,
  /** Loop back-edges and function entries between two preemption checks. */
  preemptBudget: 20000,
  /** memory.fill/copy/init, and the bytes a WASI call moves, count one back-edge against preemptBudget per this many bytes (a power of two). */
  preemptBulkBytesPerCount: 256,
  /** A paused vCPU must reach a safe point within this time or the pause fails. */
  pauseTimeoutMs: 5000,

  /** Disk block size (replication and migration unit). */
  diskBlockBytes: 4096,
  /** Stale lock entries (of dead processes) one open of a disk image removes at most. */
  diskLockStaleEntriesMax: 1024,
  /** Times one open of a disk image takes over a dead writer's lock entry before DRIVE_LOCKED. */
  diskLockStaleTakeoversMax: 16,
  /**
   * Other images' lock directories one lock taken looks at (from a random place in the lock
   * root), removing those whose holders are all gone: the directories of SIGKILLed holders of
   * since deleted images, which no later opener of that inode takes over, do not pile up.
   */
  diskLockSweepDirsMax: 16,
  /** A lock directory changed this recently is not swept (an opener may be making its entry). */
  diskLockSweepIdleMs: 10_000,
  /**
   * A migration onto the source's own image that fails or is cancelled after the destination
   * took the image's lock but before `go`: how long the source tries to take it back (the
   * destination lets it go once it sees the abort or the channel close), every
   * diskLockHandbackRetryMs, before it stays paused with an error (cont tries again).
   */
  diskLockHandbackWaitMs: 3000,
  diskLockHandbackRetryMs: 20,
  /**
   * A destination that cannot take the source's shared image at its restore looks this long on
   * the main channel for a cancel's abort frame (the source takes its image back only after
   * sending it) before it reports the lock as the failure.
   */
  diskLockAbortWaitMs: 500,
  /** Largest disk image. */
  diskBytesMax: 16 * 1024 * 1024 * 1024,
  /**
   * A guest write that found the host's filesystem full waits in its call (the VM is in state
   * io-error) and is tried again this often, or at once on `cont`.
   */
  diskFullRetryMs: 1000,
  /**
   * A guest console write whose stdout takes nothing for now (a pipe nobody reads) waits in
   * its call, trying again this often (a pause ends the wait).
   */
  serialFullRetryMs: 5,
  /**
   * A guest disk read or write that fails on the host other than for space (EIO to the guest,
   * BLOCK_IO_ERROR action report for each) is logged at most once per this time, with a count
   * of those in between: a guest that retries in a loop must not flood the log.
   */
  diskErrorLogIntervalMs: 10_000,

  /** Largest single frame of a migration stream or state file. */
  frameBytesMax: 8 * 1024 * 1024,
  /** Largest device-state blob. */
  deviceStateBytesMax: 64 * 1024 * 1024,
  /** Pages per RAM frame / multifd packet. */
  pagesPerPacketMax: 128,
  /** Multifd channels. */
  multifdChannelsMax: 16,
  multifdChannelsDefault: 2,
  /** Zero pages (offsets only) in one multifd packet. */
  multifdZeroPagesPerPacketMax: 16384,
  /** Packets a multifd sender prepares ahead of the socket (each slot holds one packet). */
  multifdSendSlots: 8,
  /** Pre-copy rounds before stop-and-copy is forced. */
  precopyRoundsMax: 30,
  downtimeLimitMsDefault: 300,
  /** Largest downtime-limit accepted (QEMU's bound: 2000 s). */
  downtimeLimitMsMax: 2000 * 1000,
  /**
   * A dirty round that moves at least this many bytes measures the link (its rate is the
   * bandwidth estimate); until one did, the fastest round stands for it (SourceCore.sample).
   */
  bandwidthSampleBytesMin: 1024 * 1024,
  /** Connecting a migration channel (main or multifd), TCP connect plus handshake. */
  migrationConnectTimeoutMs: 10000,
  /** The destination answers the source's hello and setup within this time. */
  migrationHandshakeTimeoutMs: 30000,
  /**
   * The source's pre-copy (status active) during which nothing moves for this long — no byte of
   * the main channel taken by the kernel or received, no packet written by a multifd channel —
   * has stalled: a destination host gone silent (no FIN, no RST), one channel's path that
   * forwards nothing. It fails (MIGRATION_STALLED), its channels dropped, the VM running on;
   * without it only migrate_cancel or yank ended it (QEMU waits for good). Far above any quiet
   * moment of a healthy migration under CPU load; under max-bandwidth the wait for one paced
   * write (migrationStallPacedWrites of them) counts on top (OutgoingMigration.watchActive).
   */
  migrationStallMs: 20000,
  /** Paced writes (of pagesPerPacketMax pages per channel) a throttled migration may wait for, beyond migrationStallMs. */
  migrationStallPacedWrites: 2,
  /**
   * The source's VM is paused from stop-and-copy until the destination confirms it loaded the
   * state; this bounds the whole pause, from the moment the VM is paused (writing the last
   * round included: a destination that stopped reading blocks it). Past this the migration
   * fails, its channels are dropped and the source runs again.
   */
  switchoverTimeoutMs: 30000,
  /**
   * A cancelled migration's main channel (also one that connected only after the cancel)
   * stays open this long, in the background, for the abort frame queued behind the rest of the
   * stream: a destination that reads slowly, or not for a while (the channel is stalled),
   * still reads up to it and logs a cancel, not a truncated stream. It closes as soon as the destination does; the cancel itself (status
   * cancelled, the VM running again) does not wait for it, nor does the process's exit.
   */
  migrationAbortDeliveryMs: 30000,
  /** After `go`, how long the source waits for the destination's `resumed` (for the downtime figure). */
  resumedNoticeTimeoutMs: 5000,
  /** Frames the destination's main channel has received but not yet applied, in bytes, before it stops reading. */
  mainChannelQueueBytesMax: 64 * 1024 * 1024,
  /** Bytes a main channel lets wait in its socket's buffer before a sender waits for it to drain. */
  mainChannelWriteBufferBytesMax: 4 * 1024 * 1024,
  /** Page ranges in one ramZeroRanges frame. */
  ramZeroRangesPerFrameMax: 65536,
  /**
   * A destination whose source's stream ended early (closed, or cut inside a frame) reports it
   * this long after: a process stopped together with its source (colo up stopping a pair,
   * Ctrl-C to a process group) may see the stream end before its own stop arrives, and by then
   * it has begun to exit and logs the ending at info level, not as a failure.
   */
  incomingBreakReportDelayMs: 250,
  /**
   * A connection to a multifd receiver's port must send its channel hello within this time (a
   * source sends it right behind its connect); one that does not is closed. Connections still
   * without a hello are at most multifdPendingConnectionsMax per port: a new one past that
   * closes the oldest, so stray or idle peers on the network can neither exhaust the process's
   * file descriptors nor keep the source's own channel out for long.
   */
  multifdHelloTimeoutMs: 10000,
  multifdPendingConnectionsMax: 8,
  /** When the main channel closes, the destination waits this long for the multifd channels to report how they ended. */
  multifdEndWaitMs: 500,
  /**
   * A multifd channel that closed or was cut inside a packet is what a cancel looks like as
   * well as a crash: a cancelling source drops its multifd channels at once and says why on
   * the main channel (the abort frame). The destination looks this long on the main channel
   * for that abort (or its end) before it reports the channel's break as the failure.
   */
  multifdBreakAbortWaitMs: 2000,
  /** A multifd receiver waits this long for guest RAM to grow to a page it was sent. */
  ramGrowWaitMs: 10000,
  /**
   * A multifd receiver with the first packet of round n waits this long for round n-1's
   * barrier (every other channel applied its pages of round n-1).
   */
  multifdRoundOrderWaitMs: 30000,
  /** Blocks read from the disk at once when a migration round scans it. */
  diskReadBlocksMax: 256,
  /** COLO periodic checkpoint interval default (QEMU's default is 20000 ms). */
  checkpointDelayMsDefault: 20000,
  /** x-checkpoint-delay is a uint32 in QEMU (about 49.7 days). */
  checkpointDelayMsMax: 2 ** 32 - 1,
  /** The longest one setTimeout waits (Node turns a longer one into 1 ms); longer waits are chained. */
  timerMsMax: 2 ** 31 - 1,

  /** Open guest connections at once. */
  nicConnectionsMax,
  /**
   * Input one client connection may have on its way to the guest (bytes, plus nicInputEventCharge
   * per data event) before the front end stops reading its socket; it reads again once the
   * guest has consumed half of it. A client that floods a guest which does not read costs the
   * host at most this much per connection.
   */
  nicConnectionInputWindowBytes,
  /** What one input data event counts against the window besides its bytes (bounds the events, not only the bytes). */
  nicInputEventCharge,
  /** The vCPU tells the front end what a connection's guest consumed in steps of this (at most half the window). */
  nicInputCreditBytes: 256 * 1024,
  /** Guest output a client has not read (bytes in its socket's buffer) before the front end stops reading that client's input. */
  nicClientOutputBufferedBytesMax: 256 * 1024,
  /**
   * Guest output a client has not read (bytes in its socket's buffer) above which its
   * connection is reset. Nothing pushes back on the guest's sends, and a client that sends many
   * requests and reads none of the replies would otherwise make the host queue every reply (the
   * input window bounds the requests, not what they produce). Generous: far above what a reader
   * that is merely slow leaves (the reading pause at nicClientOutputBufferedBytesMax stops its
   * input first), and above kv's largest value.
   */
  nicClientOutputUnsentBytesMax: 96 * 1024 * 1024,
  /** A state's unread input bytes of one connection or one event (restore validation; the window keeps real ones far below). */
  nicConnectionInputBytesMax: 4 * 1024 * 1024,
  /**
   * Pending input events not yet admitted by the guest: what the windows of all connections
   * can hold (each data event is charged nicInputEventCharge, one socket read may overshoot the
   * window, and a connection adds its open and close).
   */
  nicPendingEventsMax: nicConnectionsMax * (Math.ceil((nicConnectionInputWindowBytes + socketReadBytesMax) / nicInputEventCharge) + 3),
  /** Bytes of client input in flight from the main thread to the vCPU (a power of two; input beyond waits in the main thread). */
  nicInputRingBytes: 8 * 1024 * 1024,
  /**
   * A connection the guest closed keeps its socket until its unsent output went out and the
   * client ended its side too, or this long at most (a client that neither reads nor closes
   * would otherwise hold the socket, a slot of the listener, and the front end's close, for good).
   */
  nicClosedConnectionLingerMs: 10000,
  /** Bytes one guest send takes at most (sock_send iovecs together); a larger one is a short write. */
  nicSendBytesMax: 1024 * 1024,

  /** QMP: longest command line, and pending commands of one client. */
  qmpLineBytesMax: 1024 * 1024,
  qmpClientsMax: 16,

  /** Serial output held in memory when writing to a slow sink. */
  serialBufferBytesMax: 1024 * 1024,
  /** Guest argv/environ total bytes. */
  guestArgsBytesMax: 64 * 1024,
  /** iovecs per fd_read/fd_write/sock_* call. */
  iovecsMax: 1024,
  /**
   * Bytes one fd_write, fd_pwrite, fd_read or fd_pread moves at most (the host copies them
   * once). A larger call is short, as a real file's may be, and the guest makes another for
   * the rest: the host never allocates more for one call, whatever the iovecs add up to.
   */
  fdIoBytesMax: 4 * 1024 * 1024,
  /** poll_oneoff subscriptions per call. */
  pollSubscriptionsMax: 4096,

  /** QMP: in-band commands of one client queued or running before the server stops reading its socket (QEMU's QMP_REQ_QUEUE_LEN_MAX); the same bound applies to its out-of-band commands in flight. */
  qmpPendingCommandsMax: 8,
  /** QMP: deepest nesting of arrays and objects accepted in one command (QEMU's JSON parser allows 1024). */
  qmpJsonDepthMax: 1024,
  /** QMP: unread reply and event bytes queued for one client before the server drops it; also the longest line a QMP client accepts from a server. */
  qmpOutputBytesMax: 16 * 1024 * 1024,
  /** QMP client: events kept in its log for waitEvent (older ones are dropped first). */
  qmpClientEventLogMax: 100000,
  /**
   * colo up: events its QMP connection to a child keeps. It waits only for events that follow
   * a command it just sent; a child sends a STOP and a RESUME per checkpoint, which would fill
   * qmpClientEventLogMax (megabytes per child) on a pair that runs for hours. Its heartbeat
   * connection keeps none.
   */
  upQmpEventLogMax: 1000,
  /** QMP client: default time allowed to connect, for a reply or for an event. */
  qmpTimeoutMsDefault: 10000,
  /**
   * `colo qmp`, `colo migrate`: time allowed for the greeting, which a QMP server (QEMU's, ours) sends as soon
   * as it accepts. A port that is not QMP's and says nothing (a guest's own service) fails after
   * this, not after qmpTimeoutMsDefault.
   */
  qmpShellGreetingTimeoutMs: 3000,
  /**
   * pmemsave/memsave: guest RAM bytes handed to one file write. The writes run off the main
   * thread, and other QMP clients are answered between them.
   */
  pmemsaveChunkBytes: 8 * 1024 * 1024,

  /** colo up: a child's QMP socket must answer within this time after it is started. */
  upChildStartTimeoutMs: 60000,
  /** colo up: default for --protect-timeout: the initial migration into COLO (protecting the pair) that moves no byte for this long is a failed attempt. */
  upProtectTimeoutMs: 120000,
  /** colo up: x-colo-lost-heartbeat and its COLO_EXIT on a survivor. */
  upFailoverTimeoutMs: 10000,
  /** colo up: consecutive failed attempts to protect the pair before it stays unprotected. */
  upProtectAttemptsMax: 5,
  /** colo up: pause before another attempt to protect the pair, times the failures so far. */
  upProtectRetryDelayMs: 1000,
  /**
   * colo up: after upProtectAttemptsMax failures in a row, the pair stays unprotected but is
   * tried again this often (a full disk freed, a port released), quietly.
   */
  upProtectRetryLaterMs: 60000,
  /**
   * colo up: a protection that ends (either node dies, or the primary leaves COLO by itself)
   * sooner than this after it began counts as a failed attempt, so a child that dies at every
   * start, or a link that breaks at every checkpoint, is retried with the growing pause, not at
   * once: each attempt migrates all of RAM and disk and pauses the primary.
   */
  upProtectStableMs: 30000,
  /**
   * colo up: a child whose QMP connection closed under a command is given this long for its
   * exit to be seen before the command's failure is acted on (a dying child closes it first).
   */
  upChildExitGraceMs: 1000,
  /**
   * colo up: how often the pid of a child adopted from a supervisor that died is checked (it is
   * not this process's child, so no exit event comes): the delay a failover adds for it.
   */
  upAdoptedExitPollMs: 50,
  /**
   * colo up: a COLO secondary whose guest crashed is left to the primary, whose checkpoint
   * replaces its state within coloSvmCrashResyncGapPauses pauses; one that its heartbeat (or,
   * with the heartbeat off, the crash watch) still finds crashed after this long was not
   * replaced, and is fenced (killed and replaced).
   */
  upSecondaryCrashedMs: 5000,
  /**
   * colo up: a COLO secondary whose guest crashed this many times within
   * upSecondaryCrashWindowMs is replaced (killed; a new one gets a fresh migration) instead of
   * resynced again: a state that crashes only the SVM whenever it runs (a divergence) would
   * otherwise cost the primary a resync checkpoint's pause every few pauses for ever, while the
   * pair reports protection from a secondary that is crashed most of the time. A new secondary
   * drops whatever the old one held apart from the checkpoints (its RAM cache, its disk copy,
   * its host-side device state); one that crashes the same way ends its protection early, and
   * the failed-attempt rules (upProtectStableMs, upProtectAttemptsMax) pace the next ones.
   * Occasional crashes (fewer, or further apart) are left to the resync.
   */
  upSecondaryCrashesMax: 10,
  upSecondaryCrashWindowMs: 60000,
  /**
   * colo up, adopting a child whose partner died while no supervisor ran: how long it is asked
   * x-colo-lost-heartbeat (each time for upFailoverTimeoutMs) while it does not answer (stopped,
   * hung). After that the adoption is refused, the children left as they are, so that the run
   * of colo up ends with the reason instead of hanging before it supervises anything.
   */
  upAdoptFailoverMs: 20000,
  /**
   * colo up, adopting children that are no pair it can tell apart (a primary still in the
   * switchover of a re-protection, `finish-migrate` and COLO mode none, next to a secondary
   * already in COLO): it looks again every upAdoptLookAgainMs for this long before it refuses.
   * A colo up restarted (by hand or by a service manager) in that moment was refused with
   * status 2 for a state that passes within milliseconds.
   */
  upAdoptSettleMs: 5000,
  upAdoptLookAgainMs: 200,
  /** colo up: after SIGTERM, children that have not exited within this time are SIGKILLed. */
  upStopTimeoutMs: 5000,
  /**
   * colo up: after the secondary's guest exited (its process ended), how long the primary may
   * neither exit nor leave COLO (it waits coloSvmExitWaitMs for its own guest's exit, then
   * coloGuestExitDrainMs for its last output) before the secondary is taken for dead.
   */
  upSvmGuestExitWaitMs: 15000,
  /** A COLO secondary that took over while its service address was still in use tries to listen again this often. */
  netTakeoverListenRetryMs: 1000,
  /** colo up: how often each child is asked `query-status` on a QMP connection of its own (the heartbeat). */
  upHeartbeatIntervalMs: 100,
  /**
   * colo up: default for --heartbeat-timeout. A child whose QMP answer is this late is hung
   * (stopped, deadlocked, starved): one that has a partner to fail over to is SIGKILLed, which
   * fences it (it can never serve again) and runs the failover of a crash. Long enough for a
   * checkpoint pause or a garbage collection (tens of ms) many times over.
   */
  upHeartbeatTimeoutMsDefault: 1000,
  /** colo up: default x-checkpoint-delay (shorter than QEMU's 20 s: a pair on one host checkpoints cheaply). */
  upCheckpointDelayMsDefault: 1000,

  /**
   * COLO: resync checkpoints for SVM crashes come no closer than this (ms) after the last one,
   * nor closer than coloSvmCrashResyncGapPauses times the last checkpoint's pause: a state that
   * crashes the SVM whenever it runs (a trap only the secondary takes, for a while) would
   * otherwise keep the PVM paused most of the time. The SVM waits crashed that long, at most.
   */
  coloSvmCrashResyncGapMinMs: 10,
  coloSvmCrashResyncGapPauses: 4,
  /** COLO compare: output that waited this long on one side asks for a checkpoint (QEMU's compare_timeout, 3000 ms there). */
  coloCompareTimeoutMs: 300,
  /** COLO compare: how often held output is scanned for the timeout. */
  coloCompareScanMs: 50,
  /** COLO compare: held output bytes (both guests, all connections) above which a checkpoint is asked for. */
  coloCompareHeldBytesMax: 64 * 1024 * 1024,
  /**
   * COLO compare: connections both guests closed in one checkpoint interval (their ids are
   * remembered until the next checkpoint) at which a checkpoint is asked for: with a long
   * x-checkpoint-delay, connection churn would otherwise grow that set without end.
   */
  coloCompareClosedConnectionsMax: 65536,
  /**
   * COLO: mirrored input the primary has written and the secondary has not read (its socket's
   * unsent bytes, on the output channel or the main channel) above which the clients are not
   * read until it is down to half: a secondary that hangs, or whose SVM reads no input, must not
   * grow the primary's memory by what the clients send (the PVM goes on taking it).
   */
  coloMirrorUnsentBytesMax: 16 * 1024 * 1024,
  /**
   * COLO primary: clients held by coloMirrorUnsentBytesMax while the mirror goes on the SVM
   * output channel, and the secondary took not one byte of it for this long: that direction
   * of the channel stalled (a silent path one way); the channel is given up, the mirror goes on
   * the main channel (PrimaryNet.watchMirrorChannel). Checkpoints (the SVM paused, reading
   * nothing) do not count.
   */
  coloMirrorChannelStuckMs: 5000,
  /**
   * COLO: mirrored input the secondary read from the main channel that its SVM has not taken
   * yet (Machine.pendingInputBytes; the input ring's own bytes aside) above which the secondary
   * tells the primary to stop reading its clients until it is down to half: the main channel
   * is read on (checkpoints come on it), so the primary's coloMirrorUnsentBytesMax does not see
   * an SVM that falls behind a PVM taking input faster.
   */
  coloSvmInputPendingBytesMax: 16 * 1024 * 1024,
  /** COLO: mirrored input or SVM output bytes per coloNet frame (below frameBytesMax). */
  coloNetBatchBytes: 1024 * 1024,
  /** COLO: how long the secondary waits for the primary to open the SVM output channel (and for its hello). */
  coloOutputChannelTimeoutMs: 5000,
  /** COLO: a pause gives up the SVM output channel when the primary has read nothing from its full socket for this long. */
  coloOutputChannelStuckMs: 100,
  /**
   * COLO primary: compare timeouts in a row (each one checkpoint) through which the SVM output
   * channel delivered not one byte, after which the primary gives it up: a silent path (open,
   * forwarding nothing) that light traffic never fills to coloOutputChannelStuckMs, and whose
   * close the secondary would never see, otherwise held every request until a timeout
   * checkpoint, for good. Output and mirror then go on the main channel, as after a break.
   */
  coloOutputChannelSilentTimeouts: 3,
  /**
   * COLO: once the secondary said its output moved to the main channel, the primary waits at
   * most this long for the end of the SVM output channel (what it still delivers is older)
   * before it closes the channel itself and compares what came on the main channel.
   */
  coloOutputChannelDrainMs: 1000,
  /**
   * COLO primary: a checkpoint in flight (from CHECKPOINT_REQUEST to VMSTATE_LOADED) during
   * which nothing moves between the nodes for this long — no byte of the main channel or of a
   * multifd channel taken by the network, none received from the secondary — is stuck: one of
   * its connections stalled (a silent path, a peer that stopped reading), and its round's
   * barrier or reply would never come while client output stays held. The channels are then
   * dropped as by a yank and the link counts as lost (the grace, then the primary goes on
   * alone). Far above a checkpoint's steps that move nothing (the SVM's pause, bounded by
   * pauseTimeoutMs; the apply).
   */
  coloCheckpointStallMs: 10000,
  /**
   * COLO primary whose guest exited by itself (proc_exit): how long its process waits, before
   * SHUTDOWN and its exit, for the SVM's copy of the output the compare still holds (the
   * guest's last replies, which the SVM's guest produces too on its way to the same exit).
   * What is not matched by then is dropped, as at any exit of the primary.
   */
  coloGuestExitDrainMs: 1000,
  /**
   * COLO primary told by the secondary that the SVM's guest exited (GUEST_EXITED): how long it
   * waits for its own guest's exit (the same run, behind: a PVM slowed by its host, or stopped
   * a while) before it takes the pair for diverged and goes on unprotected (COLO_EXIT, reason
   * error). Clients' output the SVM's copy did not match waits for the end of that wait.
   */
  coloSvmExitWaitMs: 10000,
  /** COLO: checkpoint pause times kept for mean/p99 in query-migrate. */
  coloPauseSamplesMax: 10000,
  /** Requests and events a latency trace (COLO_TRACE_DIR, core/latency-trace.ts) keeps: about 24 and 16 bytes each. */
  latencyTraceRequestsMax: 2_000_000,
  latencyTraceEventsMax: 1_000_000,
  /**
   * COLO primary: a checkpoint of at most this many bytes of pages is copied in the pause and
   * sent while the PVM runs on; a larger one is sent from guest RAM with the PVM paused until
   * VMSTATE_RECEIVED. It also bounds the copy's resident size: once the pages it ever held
   * reach this, it is replaced by a fresh one (ARCHITECTURE §5 step 2).
   */
  coloCheckpointCopyBytesMax: 64 * 1024 * 1024,
  /**
   * COLO secondary: disk blocks of the checkpoint in flight (they reach the disk only in its
   * apply) held in memory, in bytes of blocks (a zero block counts as a whole one). Blocks
   * beyond wait in an unlinked staging file in $TMPDIR that every apply empties, so a guest
   * that rewrites a large disk between two checkpoints does not need that much memory here.
   */
  coloCheckpointDiskHeldBytesMax: 64 * 1024 * 1024,
} as const;

export type Limits = typeof limits;
