/**
 * The expression walker of the guest instrumentation. It rewrites every defined function
 * of a binaryen module in place:
 *
 * - preemption: at the function entry and at the head of every loop body it inserts
 *   `budget -= 1; if (budget < 0) { budget = reset; call preempt() }` — all inline, so the
 *   fast path is a global load, a subtract, a global store, a compare and a branch;
 *   memory.fill, memory.copy and memory.init also take their size (one count per
 *   2^bulkBytesShift bytes) from the budget, so that the next check preempts a loop whose
 *   iterations move megabytes;
 * - store logging (optional): after every store, atomic read-modify-write, compare-exchange,
 *   memory.fill, memory.copy and memory.init it writes 1 into a byte map at
 *   `dirtylog + (addr >>> pageShift)` for the first and the last byte written. The mark is
 *   written AFTER the store, so a host that harvests (reads and clears) the map while the
 *   guest runs never loses a write: a page whose mark it cleared is either already written
 *   or will be marked again.
 *
 * binaryen's own `log-execution` and `instrument-memory` passes were not used: the first
 * also logs at every return and function exit (twice the checks), and the second calls its
 * hook before the store happens, which loses writes under concurrent harvesting.
 */
import binaryen from 'binaryen';

type Ref = number;

/** What the walker inserts, and where the globals and imports it uses are. */
export interface WalkConfig {
  /** Internal name of the mutable i32 budget global. */
  budgetGlobal: string;
  /** Value the budget is reset to when it drops below zero. */
  budgetReset: number;
  /** Internal name of the imported `() -> ()` function called when the budget runs out. */
  preemptFunction: string;
  /** Store logging, or null for none. */
  storeLog: null | {
    /** Internal name of the mutable i32 global holding the address of the byte map. */
    logGlobal: string;
    /** log2 of the page size the map tracks. */
    pageShift: number;
  };
  /** Internal name of the module's memory. */
  memoryName: string;
  /**
   * colo's region above the guest's pages (reserved-region.ts), which the guest must not see:
   * `memory.size` becomes `global.get pagesGlobal` (the internal name of the mutable i32
   * global holding the guest's size in pages), and `memory.grow(n)` becomes a call of
   * `growFunction` (`(i32) -> i32`, the host's colo.grow, which moves the region up and
   * returns the guest's old size).
   */
  reserved: { pagesGlobal: string; growFunction: string };
  /**
   * log2 of the bytes of memory.fill/copy/init that count as one loop iteration against the
   * budget: a loop whose body fills or copies megabytes reaches its next check with the budget
   * spent, not 20000 iterations later.
   */
  bulkBytesShift: number;
}

/** Counts of what the walker changed, for tests and diagnostics. */
export interface WalkStats {
  functions: number;
  loops: number;
  stores: number;
  rmws: number;
  bulk: number;
  memorySizes: number;
  memoryGrows: number;
  /** Functions left without an entry check (no loop, no call). */
  leaves: number;
}

const addVar = (binaryen as unknown as { _BinaryenFunctionAddVar(f: number, t: number): number })._BinaryenFunctionAddVar;

const E = binaryen;
type Fn = (...args: number[]) => number;
/** binaryen.js's expression classes (Block, Store, ...), which its type declarations omit. */
const X = binaryen as unknown as Record<string, Record<string, Fn>>;

/** The child expressions of `e` in evaluation order (0 for an absent optional child). */
function children(e: Ref, id: number): Ref[] {
  switch (id) {
    case E.BlockId: {
      const n = X.Block.getNumChildren(e);
      const out: Ref[] = new Array(n);
      for (let i = 0; i < n; i++) out[i] = X.Block.getChildAt(e, i);
      return out;
    }
    case E.IfId: return [X.If.getCondition(e), X.If.getIfTrue(e), X.If.getIfFalse(e)];
    case E.LoopId: return [X.Loop.getBody(e)];
    case E.BreakId: return [X.Break.getValue(e), X.Break.getCondition(e)];
    case E.SwitchId: return [X.Switch.getValue(e), X.Switch.getCondition(e)];
    case E.CallId: {
      const n = X.Call.getNumOperands(e);
      const out: Ref[] = new Array(n);
      for (let i = 0; i < n; i++) out[i] = X.Call.getOperandAt(e, i);
      return out;
    }
    case E.CallIndirectId: {
      const n = X.CallIndirect.getNumOperands(e);
      const out: Ref[] = new Array(n + 1);
      for (let i = 0; i < n; i++) out[i] = X.CallIndirect.getOperandAt(e, i);
      out[n] = X.CallIndirect.getTarget(e);
      return out;
    }
    case E.LocalSetId: return [X.LocalSet.getValue(e)];
    case E.GlobalSetId: return [X.GlobalSet.getValue(e)];
    case E.LoadId: return [X.Load.getPtr(e)];
    case E.StoreId: return [X.Store.getPtr(e), X.Store.getValue(e)];
    case E.AtomicRMWId: return [X.AtomicRMW.getPtr(e), X.AtomicRMW.getValue(e)];
    case E.AtomicCmpxchgId: return [X.AtomicCmpxchg.getPtr(e), X.AtomicCmpxchg.getExpected(e), X.AtomicCmpxchg.getReplacement(e)];
    case E.AtomicWaitId: return [X.AtomicWait.getPtr(e), X.AtomicWait.getExpected(e), X.AtomicWait.getTimeout(e)];
    case E.AtomicNotifyId: return [X.AtomicNotify.getPtr(e), X.AtomicNotify.getNotifyCount(e)];
    case E.MemoryInitId: return [X.MemoryInit.getDest(e), X.MemoryInit.getOffset(e), X.MemoryInit.getSize(e)];
    case E.MemoryCopyId: return [X.MemoryCopy.getDest(e), X.MemoryCopy.getSource(e), X.MemoryCopy.getSize(e)];
    case E.MemoryFillId: return [X.MemoryFill.getDest(e), X.MemoryFill.getValue(e), X.MemoryFill.getSize(e)];
    case E.UnaryId: return [X.Unary.getValue(e)];
    case E.BinaryId: return [X.Binary.getLeft(e), X.Binary.getRight(e)];
    case E.SelectId: return [X.Select.getIfTrue(e), X.Select.getIfFalse(e), X.Select.getCondition(e)];
    case E.DropId: return [X.Drop.getValue(e)];
    case E.ReturnId: return [X.Return.getValue(e)];
    case E.MemoryGrowId: return [X.MemoryGrow.getDelta(e)];
    case E.NopId: case E.LocalGetId: case E.GlobalGetId: case E.ConstId: case E.MemorySizeId:
    case E.UnreachableId: case E.AtomicFenceId: case E.DataDropId:
      return [];
    default:
      throw new Error(`instrumentation cannot walk expression id ${id}: ${E.emitText(e).slice(0, 200)}`);
  }
}

function setChild(e: Ref, id: number, i: number, c: Ref): void {
  switch (id) {
    case E.BlockId: X.Block.setChildAt(e, i, c); return;
    case E.IfId: (i === 0 ? X.If.setCondition : i === 1 ? X.If.setIfTrue : X.If.setIfFalse)(e, c); return;
    case E.LoopId: X.Loop.setBody(e, c); return;
    case E.BreakId: (i === 0 ? X.Break.setValue : X.Break.setCondition)(e, c); return;
    case E.SwitchId: (i === 0 ? X.Switch.setValue : X.Switch.setCondition)(e, c); return;
    case E.CallId: X.Call.setOperandAt(e, i, c); return;
    case E.CallIndirectId:
      if (i === X.CallIndirect.getNumOperands(e)) X.CallIndirect.setTarget(e, c);
      else X.CallIndirect.setOperandAt(e, i, c);
      return;
    case E.LocalSetId: X.LocalSet.setValue(e, c); return;
    case E.GlobalSetId: X.GlobalSet.setValue(e, c); return;
    case E.LoadId: X.Load.setPtr(e, c); return;
    case E.StoreId: (i === 0 ? X.Store.setPtr : X.Store.setValue)(e, c); return;
    case E.AtomicRMWId: (i === 0 ? X.AtomicRMW.setPtr : X.AtomicRMW.setValue)(e, c); return;
    case E.AtomicCmpxchgId:
      (i === 0 ? X.AtomicCmpxchg.setPtr : i === 1 ? X.AtomicCmpxchg.setExpected : X.AtomicCmpxchg.setReplacement)(e, c);
      return;
    case E.AtomicWaitId: (i === 0 ? X.AtomicWait.setPtr : i === 1 ? X.AtomicWait.setExpected : X.AtomicWait.setTimeout)(e, c); return;
    case E.AtomicNotifyId: (i === 0 ? X.AtomicNotify.setPtr : X.AtomicNotify.setNotifyCount)(e, c); return;
    case E.MemoryInitId: (i === 0 ? X.MemoryInit.setDest : i === 1 ? X.MemoryInit.setOffset : X.MemoryInit.setSize)(e, c); return;
    case E.MemoryCopyId: (i === 0 ? X.MemoryCopy.setDest : i === 1 ? X.MemoryCopy.setSource : X.MemoryCopy.setSize)(e, c); return;
    case E.MemoryFillId: (i === 0 ? X.MemoryFill.setDest : i === 1 ? X.MemoryFill.setValue : X.MemoryFill.setSize)(e, c); return;
    case E.UnaryId: X.Unary.setValue(e, c); return;
    case E.BinaryId: (i === 0 ? X.Binary.setLeft : X.Binary.setRight)(e, c); return;
    case E.SelectId: (i === 0 ? X.Select.setIfTrue : i === 1 ? X.Select.setIfFalse : X.Select.setCondition)(e, c); return;
    case E.DropId: X.Drop.setValue(e, c); return;
    case E.ReturnId: X.Return.setValue(e, c); return;
    case E.MemoryGrowId: X.MemoryGrow.setDelta(e, c); return;
    default:
      throw new Error(`instrumentation cannot set a child of expression id ${id}`);
  }
}

interface Frame {
  e: Ref;
  id: number;
  kids: Ref[];
  next: number;
  /** Highest temp level used in each child's subtree (-1: none). */
  kidLevel: number[];
}

/**
 * Rewrite the tree under `body` bottom-up without recursion (bodies can be deeper than the JS
 * stack): `finish` gets each expression after all its children were finished (their results
 * in kidLevel, -1 for an absent child) and returns its replacement, which is put in its
 * parent's place, and a number for its parent. Returns the new body.
 */
function rewritePostOrder(body: Ref, finish: (fr: Frame) => [Ref, number]): Ref {
  const frame = (e: Ref, id: number): Frame => {
    const kids = children(e, id);
    return { e, id, kids, next: 0, kidLevel: kids.map(() => -1) };
  };
  const stack: Frame[] = [frame(body, E.getExpressionId(body))];
  let newBody = body;
  while (stack.length > 0) {
    const fr = stack[stack.length - 1]!;
    if (fr.next < fr.kids.length) {
      const c = fr.kids[fr.next++]!;
      if (c !== 0) stack.push(frame(c, E.getExpressionId(c)));
      continue;
    }
    stack.pop();
    const [out, level] = finish(fr);
    const parent = stack[stack.length - 1];
    if (parent === undefined) {
      newBody = out;
    } else {
      const i = parent.next - 1;
      parent.kidLevel[i] = level;
      if (out !== fr.e) setChild(parent.e, parent.id, i, out);
    }
  }
  return newBody;
}

/**
 * Instruments every defined function in `funcs` (FunctionRefs) of module `m` as described in
 * the file comment. Functions added later (asyncify's, the caller's helpers) are untouched.
 */
export function instrumentFunctions(m: binaryen.Module, funcs: Ref[], cfg: WalkConfig): WalkStats {
  const stats: WalkStats = { functions: 0, loops: 0, stores: 0, rmws: 0, bulk: 0, memorySizes: 0, memoryGrows: 0, leaves: 0 };
  const i32 = binaryen.i32;
  const mem = cfg.memoryName;

  const check = (): Ref =>
    m.block(null, [
      m.global.set(cfg.budgetGlobal, m.i32.sub(m.global.get(cfg.budgetGlobal, i32), m.i32.const(1))),
      m.if(
        m.i32.lt_s(m.global.get(cfg.budgetGlobal, i32), m.i32.const(0)),
        m.block(null, [
          m.global.set(cfg.budgetGlobal, m.i32.const(cfg.budgetReset)),
          m.call(cfg.preemptFunction, [], binaryen.none),
        ]),
      ),
    ], binaryen.none);

  for (const f of funcs) {
    stats.functions++;
    const temps = new Map<string, number>();
    const temp = (type: number, role: string, level: number): number => {
      const key = `${type}:${role}:${level}`;
      let index = temps.get(key);
      if (index === undefined) {
        index = addVar(f, type);
        temps.set(key, index);
      }
      return index;
    };

    const log = cfg.storeLog;
    /** `map[addr >>> shift] = 1` where `addr` is an i32 expression. */
    const mark = (addr: Ref): Ref =>
      m.i32.store8(
        0,
        1,
        m.i32.add(m.global.get(log!.logGlobal, i32), m.i32.shr_u(addr, m.i32.const(log!.pageShift))),
        m.i32.const(1),
        mem,
      );
    /** Marks for a write of `bytes` bytes at `local p + offset`. */
    const marks = (p: number, offset: number, bytes: number): Ref[] => {
      const first = mark(m.i32.add(m.local.get(p, i32), m.i32.const(offset | 0)));
      if (bytes === 1) return [first];
      return [first, mark(m.i32.add(m.local.get(p, i32), m.i32.const((offset + bytes - 1) | 0)))];
    };
    /** Marks every page of the range [local d, local d + local n) when n != 0. */
    const markRange = (d: number, n: number): Ref => {
      const shift = m.i32.const(log!.pageShift);
      const firstPage = () => m.i32.shr_u(m.local.get(d, i32), shift);
      const lastPage = m.i32.shr_u(
        m.i32.sub(m.i32.add(m.local.get(d, i32), m.local.get(n, i32)), m.i32.const(1)),
        m.i32.const(log!.pageShift),
      );
      return m.if(
        m.local.get(n, i32),
        m.memory.fill(
          m.i32.add(m.global.get(log!.logGlobal, i32), firstPage()),
          m.i32.const(1),
          m.i32.add(m.i32.sub(lastPage, firstPage()), m.i32.const(1)),
          mem,
        ),
      );
    };

    /** Returns the replacement of a finished node and the highest temp level its subtree uses. */
    let straightLine = true; // no loop and no call: the function runs a bounded number of steps
    const finish = (fr: Frame): [Ref, number] => {
      const { e, id, kidLevel } = fr;
      if (id === E.CallId || id === E.CallIndirectId || id === E.LoopId) straightLine = false;
      const below = kidLevel.length === 0 ? -1 : Math.max(...kidLevel);
      if (id === E.LoopId) {
        stats.loops++;
        X.Loop.setBody(e, m.block(null, [check(), X.Loop.getBody(e)], binaryen.auto));
        return [e, below];
      }
      if (id === E.MemorySizeId) {
        stats.memorySizes++;
        return [m.global.get(cfg.reserved.pagesGlobal, i32), below];
      }
      if (id === E.MemoryGrowId) {
        stats.memoryGrows++;
        return [m.call(cfg.reserved.growFunction, [X.MemoryGrow.getDelta(e)], i32), below];
      }
      if (E.getExpressionType(e) === binaryen.unreachable) return [e, below];
      if (id === E.MemoryFillId || id === E.MemoryCopyId || id === E.MemoryInitId) {
        stats.bulk++;
        const level = Math.max(...kidLevel.slice(1)) + 1;
        const n = temp(i32, 'n', level);
        const getSize = id === E.MemoryFillId ? X.MemoryFill.getSize : id === E.MemoryCopyId ? X.MemoryCopy.getSize : X.MemoryInit.getSize;
        const setSize = id === E.MemoryFillId ? X.MemoryFill.setSize : id === E.MemoryCopyId ? X.MemoryCopy.setSize : X.MemoryInit.setSize;
        setSize(e, m.local.tee(n, getSize(e), i32));
        // Charged after the operation; the next loop or function-entry check preempts.
        const charge = m.global.set(
          cfg.budgetGlobal,
          m.i32.sub(m.global.get(cfg.budgetGlobal, i32), m.i32.shr_u(m.local.get(n, i32), m.i32.const(cfg.bulkBytesShift))),
        );
        if (log === null) return [m.block(null, [e, charge], binaryen.none), Math.max(below, level)];
        const d = temp(i32, 'd', level);
        const getDest = id === E.MemoryFillId ? X.MemoryFill.getDest : id === E.MemoryCopyId ? X.MemoryCopy.getDest : X.MemoryInit.getDest;
        const setDest = id === E.MemoryFillId ? X.MemoryFill.setDest : id === E.MemoryCopyId ? X.MemoryCopy.setDest : X.MemoryInit.setDest;
        const dest = getDest(e);
        setDest(e, m.local.get(d, i32));
        return [m.block(null, [m.local.set(d, dest), e, markRange(d, n), charge], binaryen.none), Math.max(below, level)];
      }
      if (log === null) return [e, below];
      switch (id) {
        case E.StoreId: {
          stats.stores++;
          const level = kidLevel[1]! + 1;
          const p = temp(i32, 'p', level);
          const ptr = X.Store.getPtr(e);
          X.Store.setPtr(e, m.local.get(p, i32));
          const out = m.block(null, [
            m.local.set(p, ptr),
            e,
            ...marks(p, X.Store.getOffset(e), X.Store.getBytes(e)),
          ], binaryen.none);
          return [out, Math.max(below, level)];
        }
        case E.AtomicRMWId:
        case E.AtomicCmpxchgId: {
          stats.rmws++;
          const type = E.getExpressionType(e);
          const level = Math.max(...kidLevel.slice(1)) + 1;
          const p = temp(i32, 'p', level);
          const r = temp(type, 'r', level);
          const isRmw = id === E.AtomicRMWId;
          const ptr = isRmw ? X.AtomicRMW.getPtr(e) : X.AtomicCmpxchg.getPtr(e);
          (isRmw ? X.AtomicRMW.setPtr : X.AtomicCmpxchg.setPtr)(e, m.local.get(p, i32));
          const offset = isRmw ? X.AtomicRMW.getOffset(e) : X.AtomicCmpxchg.getOffset(e);
          const bytes = isRmw ? X.AtomicRMW.getBytes(e) : X.AtomicCmpxchg.getBytes(e);
          const out = m.block(null, [
            m.local.set(p, ptr),
            m.local.set(r, e),
            ...marks(p, offset, bytes),
            m.local.get(r, type),
          ], type);
          return [out, Math.max(below, level)];
        }
        default:
          return [e, below];
      }
    };

    const body = X.Function.getBody(f);
    const newBody = body === 0 ? body : rewritePostOrder(body, finish);
    // A function without loops and calls cannot run long or recurse: it needs no entry check,
    // and without one asyncify leaves it alone (it cannot be unwound), which keeps small leaf
    // helpers such as qsort comparators fast.
    if (straightLine) {
      stats.leaves++;
      if (newBody !== body) X.Function.setBody(f, newBody);
    } else {
      X.Function.setBody(f, m.block(null, [check(), newBody], binaryen.auto));
    }
  }
  return stats;
}

/** What boundAsyncifyStack found in asyncify's output. */
export interface AsyncifyStackStats {
  /** Writes of asyncify's stack pointer that got a bounds check. */
  pointerWrites: number;
  /** The largest step by which asyncify moves its stack pointer (the biggest frame it saves). */
  frameBytesMax: number;
}

/**
 * binaryen's asyncify writes an unwound frame at its stack pointer and then moves the pointer
 * past it, and checks the pointer against the end of its buffer only in asyncify_stop_unwind,
 * after every frame was written: a call stack deeper than the buffer is written over whatever
 * follows it (guest memory). This adds, after every write of the stack pointer
 * (`data[0] = data[0] +/- step`), `if (data[0] > data[1]) unreachable`. A frame is then
 * written at most `frameBytesMax` bytes past the end the host gives asyncify (the frame whose
 * step crosses it), so the host keeps that much of its buffer beyond the end it announces,
 * and an unwind too deep for the buffer traps in the guest instead of overwriting anything.
 * Run on asyncify's output, before the module is optimised. Throws when asyncify writes its
 * pointer in a form this does not know (a binaryen whose asyncify changed): the bound would
 * not hold.
 */
export function boundAsyncifyStack(m: binaryen.Module, dataGlobal: string, memoryName: string): AsyncifyStackStats {
  const stats: AsyncifyStackStats = { pointerWrites: 0, frameBytesMax: 0 };
  const i32 = binaryen.i32;
  const globalName = X.GlobalGet.getName as unknown as (e: Ref) => string;
  const pointerOf = (e: Ref): boolean => E.getExpressionId(e) === E.GlobalGetId && globalName(e) === dataGlobal;
  const check = (): Ref =>
    m.if(
      m.i32.gt_u(m.i32.load(0, 4, m.global.get(dataGlobal, i32), memoryName), m.i32.load(4, 4, m.global.get(dataGlobal, i32), memoryName)),
      m.unreachable(),
    );
  /** The step of `data[0] = data[0] +/- step`, or null for another form. */
  const stepOf = (value: Ref): number | null => {
    if (E.getExpressionId(value) !== E.BinaryId) return null;
    const op = X.Binary.getOp(value);
    if (op !== E.AddInt32 && op !== E.SubInt32) return null;
    const left = X.Binary.getLeft(value);
    const right = X.Binary.getRight(value);
    if (E.getExpressionId(left) !== E.LoadId || !pointerOf(X.Load.getPtr(left)) || X.Load.getOffset(left) !== 0) return null;
    if (E.getExpressionId(right) !== E.ConstId) return null;
    return Math.abs(X.Const.getValueI32(right));
  };
  for (let i = 0; i < m.getNumFunctions(); i++) {
    const f = m.getFunctionByIndex(i);
    const body = X.Function.getBody(f);
    if (body === 0) continue;
    const newBody = rewritePostOrder(body, (fr) => {
      if (fr.id !== E.StoreId || !pointerOf(X.Store.getPtr(fr.e))) return [fr.e, -1];
      const step = X.Store.getOffset(fr.e) === 0 ? stepOf(X.Store.getValue(fr.e)) : null;
      if (step === null) throw new Error(`asyncify writes its data at an offset or in a form colo-vm does not bound: ${E.emitText(fr.e).slice(0, 200)}`);
      stats.pointerWrites++;
      stats.frameBytesMax = Math.max(stats.frameBytesMax, step);
      return [m.block(null, [fr.e, check()], binaryen.none), -1];
    });
    if (newBody !== body) X.Function.setBody(f, newBody);
  }
  return stats;
}
