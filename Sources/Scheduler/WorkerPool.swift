/// How a run ended, as a worker reports it (recorded in the state machine later,
/// in batches, by whoever drains the pool's completion buffer).
struct RunCompletion: Sendable {
    var runSlot: UInt32
    var runSerial: UInt64
    var attempt: Int
    var outcome: RunOutcome
    /// Why the run was cancelled, if it was (as its control said when the
    /// worker removed its task).
    var reason: CancelReason?
    var lateness: Int64
    var end: Int64
}

/// How a run ended.
enum RunOutcome: Sendable {
    case success
    case failure
    case cancelled  // threw after its task was cancelled by us
    case notStarted  // cancelled (or shut down) before the body started
}

/// The run queue between the driver and the worker tasks, as a value type:
/// runs handed over by the driver, parked workers, finished runs not yet
/// recorded, and the elastic rule that decides how many workers there are.
///
/// It never spawns, sleeps or reads a clock: time comes in as ticks, and the
/// shell (`JobScheduler`) performs what it returns (resume these parked
/// workers, spawn that many new ones, look again at that time).
///
/// The elastic rule: a worker is *stalled* while one body has kept it for at
/// least `stallThreshold`. The pool keeps `base` workers that are not stalled
/// whenever runs wait, and never more than `cap` in all; a worker that finds
/// no run while `base` others are available exits.
struct WorkerPool<Item: Sendable>: Sendable {
    /// Workers the pool keeps available when runs wait.
    let base: Int
    /// Most workers alive at once.
    let cap: Int
    /// A body running this long makes its worker count as stalled; 0 counts
    /// every worker inside a body as stalled (one worker per concurrent run).
    let stallThreshold: Int64

    /// Marks a worker slot that is not inside a body.
    static var notInBody: Int64 { .max }
    /// Marks a free worker slot.
    static var freeSlot: Int64 { .min }

    private var items: [Item?] = []
    private var head = 0
    private(set) var completions: [RunCompletion] = []
    private var idle: [CheckedContinuation<Void, Never>] = []
    /// Per worker slot: when its current body started (ticks), or `notInBody`.
    private var stamps: [Int64] = []
    private var freeSlots: [Int] = []
    private(set) var workers = 0
    /// True: every completion is recorded at once (shutdown, manual clock).
    var prompt: Bool
    /// True after shutdown began: no run is accepted, workers exit when idle.
    private(set) var closed = false
    /// The last hand-over left runs due in the timer queue (a burst).
    private var moreDue = false
    /// A worker is taking the next due runs from the timer queue (see `claimRefill`).
    private var refilling = false

    init(base: Int, cap: Int, stallThreshold: Int64, prompt: Bool) {
        self.cap = Swift.max(1, cap)
        self.base = Swift.min(Swift.max(1, base), self.cap)
        self.stallThreshold = Swift.max(0, stallThreshold)
        self.prompt = prompt
    }

    /// Runs handed over and not yet taken by a worker.
    var queued: Int { items.count - head }

    /// Entries held, taken ones included (tests check this stays bounded).
    var storedCount: Int { items.count }

    /// Workers parked waiting for runs.
    var idleWorkers: Int { idle.count }

    // MARK: - Driver side

    /// Hands runs to the workers. Returns false (and keeps nothing) once closed.
    /// `moreDue`: runs are still due in the timer queue after these (a
    /// burst); a worker then refills before the queue runs dry (`claimRefill`).
    /// `keepRefilling`: a worker's refill hands over one chunk of several
    /// (no other worker claims a refill meanwhile).
    mutating func enqueue(_ runs: [Item], moreDue: Bool = false, keepRefilling: Bool = false) -> Bool {
        refilling = keepRefilling
        self.moreDue = moreDue
        guard !closed else { return false }
        if head > 0 && head == items.count {
            items.removeAll(keepingCapacity: true)
            head = 0
        } else if head >= 1024 && head * 2 >= items.count {
            // During a long burst the queue may never run empty: drop the
            // taken prefix now and then, or `items` grows without bound.
            items.removeFirst(head)
            head = 0
        }
        // No `reserveCapacity(count + runs.count)`: an exact reservation
        // reallocates on every hand-over (quadratic over a 100k burst);
        // `append` grows geometrically.
        for r in runs { items.append(r) }
        return true
    }

    /// What the shell must do so that queued runs get a worker.
    struct Plan {
        var wake: [CheckedContinuation<Void, Never>] = []
        /// Worker slots to spawn a task for.
        var spawn: [Int] = []
        /// Look again at this instant (a busy worker may stall by then).
        var recheck: Int64?
        /// `canSpawn` was false and workers should be spawned.
        var spawnWanted = false
    }

    /// Applies the elastic rule at `now`: wakes parked workers for queued runs
    /// and spawns new ones when too few are available (only the driver, which
    /// owns the task group, can spawn: a worker passes `canSpawn: false` and
    /// learns whether it must ask the driver).
    mutating func plan(now: Int64, canSpawn: Bool = true) -> Plan {
        var plan = Plan()
        guard !closed else { return plan }
        let q = queued
        guard q > 0 else { return plan }
        let w = Swift.min(idle.count, q)
        if w > 0 {
            plan.wake = Array(idle.suffix(w))
            idle.removeLast(w)
        }
        var inBody = 0
        var stalled = 0
        var earliestFresh = Int64.max
        for s in stamps where s != Self.notInBody && s != Self.freeSlot {
            inBody += 1
            if now &- s >= stallThreshold { stalled += 1 } else { earliestFresh = Swift.min(earliestFresh, s) }
        }
        // Runs no worker outside a body (parked, woken, between runs) will take.
        let uncovered = q - (workers - inBody)
        guard uncovered > 0 else { return plan }
        let available = workers - stalled
        let wanted = stallThreshold == 0 ? uncovered : Swift.min(uncovered, base - available)
        let n = Swift.max(0, Swift.min(wanted, cap - workers))
        // Runs still uncovered: look again when the earliest busy (or just
        // woken or started) worker may count as stalled, unless no worker can
        // be added anyway (then a body ending takes the next run).
        let recheck = n < uncovered && workers + n < cap && stallThreshold > 0
        if !canSpawn {
            plan.spawnWanted = n > 0
            if n == 0 && recheck { plan.recheck = Swift.min(earliestFresh, now) &+ stallThreshold }
            return plan
        }
        for _ in 0..<n { plan.spawn.append(allocateSlot()) }
        if recheck { plan.recheck = Swift.min(earliestFresh, now) &+ stallThreshold }
        return plan
    }

    private mutating func allocateSlot() -> Int {
        workers += 1
        if let s = freeSlots.popLast() {
            stamps[s] = Self.notInBody
            return s
        }
        stamps.append(Self.notInBody)
        return stamps.count - 1
    }

    /// Takes the completions to record (by the driver at each step, by a
    /// worker when it must record at once, by statistics readers).
    mutating func takeCompletions() -> [RunCompletion] {
        if completions.isEmpty { return [] }
        defer { completions = [] }
        return completions
    }

    /// Shutdown: accept no more runs, record completions at once. Returns the
    /// runs not yet taken (they never start), the completions to record, and
    /// the parked workers to resume (they exit).
    mutating func close() -> (abandoned: [Item], completions: [RunCompletion], idle: [CheckedContinuation<Void, Never>]) {
        prompt = true
        closed = true
        var abandoned: [Item] = []
        while head < items.count {
            abandoned.append(items[head].take()!)
            head += 1
        }
        items = []
        head = 0
        let i = idle
        idle = []
        return (abandoned, takeCompletions(), i)
    }

    /// Takes the queued runs (handed over, not yet taken by a worker) for which `matching`
    /// is true, keeping the others in order: a cancelled job's runs, which then never start
    /// instead of waiting for a worker (with every worker busy, that wait could be forever).
    mutating func removeQueued(where matching: (Item) -> Bool) -> [Item] {
        guard head < items.count else { return [] }
        var removed: [Item] = []
        var kept = head
        for i in head..<items.count {
            let item = items[i].take()!
            if matching(item) {
                removed.append(item)
            } else {
                items[kept] = item
                kept += 1
            }
        }
        items.removeLast(items.count - kept)
        return removed
    }

    // MARK: - Worker side

    /// What a worker does next.
    enum Next {
        case run(Item)
        case park
        case exit
    }

    /// A worker reports its finished run (if any) and asks for the next one.
    /// `cancelled`: the worker's task is cancelled; it must not start another run.
    mutating func next(worker: Int, finished: RunCompletion?, now: Int64, cancelled: Bool) -> Next {
        if let f = finished { completions.append(f) }
        if !cancelled, head < items.count {
            let item = items[head].take()!
            head += 1
            stamps[worker] = now
            return .run(item)
        }
        stamps[worker] = Self.notInBody
        if cancelled || closed || isSurplus(excluding: worker, now: now) {
            release(worker)
            return .exit
        }
        return .park
    }

    /// During a burst (the last hand-over left runs due), the first worker
    /// to see at most `lowWater` runs queued gets true: it takes the next due
    /// runs from the timer queue now, while the other workers work off what
    /// is queued, instead of all of them finding the queue empty and waiting
    /// in turn for the scheduler's lock. It hands over what it pops
    /// (`enqueue(keepRefilling: true)`, in chunks) and then calls
    /// `endRefill(foundNone:)`. Never in `prompt` mode.
    mutating func claimRefill(lowWater: Int) -> Bool {
        guard moreDue, !refilling, !prompt, !closed, queued <= lowWater else { return false }
        refilling = true
        return true
    }

    /// A refill is over; `foundNone`: it found nothing due.
    mutating func endRefill(foundNone: Bool) {
        refilling = false
        if foundNone { moreDue = false }
    }

    /// True if `base` workers other than `worker` are available.
    private func isSurplus(excluding worker: Int, now: Int64) -> Bool {
        var available = 0
        for (i, s) in stamps.enumerated() where i != worker && s != Self.freeSlot {
            if s == Self.notInBody || now &- s < stallThreshold { available += 1 }
        }
        return available >= base
    }

    private mutating func release(_ worker: Int) {
        stamps[worker] = Self.freeSlot
        freeSlots.append(worker)
        workers -= 1
    }

    /// Parks a worker that found nothing to do, unless runs arrived or the
    /// pool closed meanwhile (then returns false: it must look again).
    mutating func park(_ c: CheckedContinuation<Void, Never>) -> Bool {
        if head < items.count || closed { return false }
        idle.append(c)
        return true
    }
}
