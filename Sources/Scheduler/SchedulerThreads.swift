#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The scheduler's own threads (`Configuration.threads`): a task executor whose idle
/// threads also keep the scheduler's timer.
///
/// Why: on Swift's global executor every fire of a job took two thread wake-ups, the
/// Dispatch timer thread that ends `clock.sleep`, then a cooperative thread for the task it
/// resumes (`perf sched` of the 10k-jobs benchmark: each wake-up waited up to 2.3 ms
/// runnable on a busy machine). Here an idle thread sleeps on a condition variable until
/// the earliest deadline and, when it passes, runs the timer's action itself (no task: it
/// wakes the driver); the driver and the worker that runs the body follow on that same
/// thread, so a fire costs one wake-up, as a Java executor's worker does.
///
/// The driver (`run()`'s own task) and the workers (children of its group) run with this
/// executor as their preference (`withTaskExecutorPreference`); bodies run on it too, and
/// anything they await elsewhere comes back to it. The threads start in `run()` and end
/// before it returns.
///
/// One mutex guards everything below; nobody holds it while running a job or a timer's
/// action. Each thread waits on a condition of its own, so that a wake-up reaches one
/// thread: at most one idle thread waits with a timeout (the *timekeeper*), the others
/// without one.
final class SchedulerThreads: TaskExecutor, @unchecked Sendable {
    // @unchecked Sendable: every `var` below is read and written only with `mutex` held
    // (the threads' `lazy` flags only by their own thread); the condition variables and
    // the mutex are pthread objects made for exactly this sharing.

    /// One thread's wait slot, also its thread-specific value.
    final class Slot {
        let cond: UnsafeMutablePointer<pthread_cond_t>
        unowned let owner: SchedulerThreads
        /// Set (under the mutex) by whoever wakes this thread.
        var signaled = false
        /// Touched only by this slot's thread: the job running now only hands work on to
        /// the task that follows it on this thread (see `lazily`).
        var lazy = false

        init(owner: SchedulerThreads) {
            self.owner = owner
            cond = .allocate(capacity: 1)
            var attr = pthread_condattr_t()
            pthread_condattr_init(&attr)
            #if !canImport(Darwin)
            pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
            #endif
            pthread_cond_init(cond, &attr)
            pthread_condattr_destroy(&attr)
        }

        deinit {
            pthread_cond_destroy(cond)
            cond.deallocate()
        }
    }

    /// A timer armed with `arm(at:_:)`.
    private struct Timer {
        let deadline: Int64
        let token: UInt64
        let action: @Sendable () -> Void
    }

    /// Threads started by `start()`.
    let count: Int
    private let now: @Sendable () -> Int64
    private let name: String
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private var jobs: [UnownedJob] = []
    private var head = 0
    /// Idle threads waiting without a timeout.
    private var idle: [Slot] = []
    /// The idle thread waiting until the earliest timer's deadline.
    private var timekeeper: Slot?
    private var timers: [Timer] = []
    private var stopping = false
    private var nextToken: UInt64 = 0
    private var running = 0
    private var stopped: [UnsafeContinuation<Void, Never>] = []

    /// Marks the threads of every `SchedulerThreads`: the value is the thread's `Slot`.
    private static let slotKey: pthread_key_t = {
        var key = pthread_key_t()
        precondition(pthread_key_create(&key, nil) == 0, "pthread_key_create failed")
        return key
    }()

    /// - Parameters:
    ///   - count: threads to run (at least 1).
    ///   - now: the scheduler's clock in ticks (nanoseconds from its epoch), the unit of
    ///     `arm(at:_:)`'s deadlines.
    init(count: Int, name: String, now: @escaping @Sendable () -> Int64) {
        self.count = Swift.max(1, count)
        self.now = now
        self.name = name
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Threads that have not yet left their loop (tests).
    var liveThreads: Int {
        lock()
        defer { unlock() }
        return running
    }

    /// Timers armed and not yet fired or disarmed (tests).
    var pendingTimers: Int {
        lock()
        defer { unlock() }
        return timers.count
    }

    /// True on one of these threads.
    var isCurrentThread: Bool { Self.isCurrentThread(of: self) }

    @inline(__always) private func lock() { pthread_mutex_lock(mutex) }
    @inline(__always) private func unlock() { pthread_mutex_unlock(mutex) }

    /// Starts the threads.
    func start() {
        lock()
        stopping = false
        running = count
        unlock()
        let made = (0..<count).map { _ in Slot(owner: self) }
        for (index, slot) in made.enumerated() {
            let box = Unmanaged.passRetained(ThreadStart(threads: self, slot: slot, index: index + 1))
            #if canImport(Darwin)
            var tid: pthread_t? = nil
            #else
            var tid = pthread_t()
            #endif
            let rc = pthread_create(&tid, nil, { arg in
                #if canImport(Darwin)
                let start = Unmanaged<ThreadStart>.fromOpaque(arg).takeRetainedValue()
                #else
                let start = Unmanaged<ThreadStart>.fromOpaque(arg!).takeRetainedValue()
                #endif
                start.threads.loop(start.slot, index: start.index)
                return nil
            }, box.toOpaque())
            precondition(rc == 0, "JobScheduler could not start its thread (\(rc)); set Configuration.threads = 0 to run on Swift's global executor")
            #if canImport(Darwin)
            pthread_detach(tid!)
            #else
            pthread_detach(tid)
            #endif
        }
    }

    /// Asks the threads to end once no job is queued, and returns when every one has left
    /// its loop. Timers still armed are dropped (their actions never run).
    func stop() async {
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            lock()
            stopping = true
            timers = []
            if running == 0 {
                unlock()
                c.resume()
            } else {
                stopped.append(c)
                for slot in idle { wake(slot) }
                idle = []
                if let t = timekeeper { wake(t) }
                unlock()
            }
        }
    }

    /// Runs a job of a task that prefers this executor.
    func enqueue(_ job: consuming ExecutorJob) {
        lock()
        if stopping && running == 0 {
            unlock()
            // Only a task that outlived `run()` can get here; let it finish elsewhere.
            globalConcurrentExecutor.enqueue(job)
            return
        }
        jobs.append(UnownedJob(job))
        let queued = jobs.count - head
        // The task that follows on the current thread (it queued one job, it will run it
        // next): no other thread needs to wake. Anything more wakes one.
        if !(queued == 1 && Self.currentSlotIsLazy(of: self)) { wakeOne() }
        unlock()
    }

    /// Wakes an idle thread if a job is queued: for a caller that handed over `lazily` but
    /// then did not return to its loop (it goes on running, e.g. a body), so that the task
    /// it resumed does not wait for it while another thread is idle.
    func wakeIfQueued() {
        lock()
        if head < jobs.count { wakeOne() }
        unlock()
    }

    /// Runs `body` so that the one task it resumes runs next on this thread, without
    /// waking another (a scheduler-internal hand-over: the timer to the driver, the driver
    /// to one worker). More than one resumed task still wakes a second thread.
    @inline(__always)
    func lazily<T>(_ body: () -> T) -> T {
        guard let raw = pthread_getspecific(Self.slotKey) else { return body() }
        let slot = Unmanaged<Slot>.fromOpaque(raw).takeUnretainedValue()
        guard slot.owner === self, !slot.lazy else { return body() }
        slot.lazy = true
        defer { slot.lazy = false }
        return body()
    }

    private static func isCurrentThread(of threads: SchedulerThreads) -> Bool {
        guard let raw = pthread_getspecific(slotKey) else { return false }
        return Unmanaged<Slot>.fromOpaque(raw).takeUnretainedValue().owner === threads
    }

    private static func currentSlotIsLazy(of threads: SchedulerThreads) -> Bool {
        guard let raw = pthread_getspecific(slotKey) else { return false }
        let slot = Unmanaged<Slot>.fromOpaque(raw).takeUnretainedValue()
        return slot.owner === threads && slot.lazy
    }

    /// Runs `action` on one of these threads once the scheduler's clock reaches `deadline`
    /// (ticks), as a scheduler-internal hand-over (`lazily`): a timer without a task. Returns
    /// a token for `disarm`. Never runs it after `stop()`.
    func arm(at deadline: Int64, _ action: @escaping @Sendable () -> Void) -> UInt64 {
        lock()
        nextToken &+= 1
        let token = nextToken
        if !stopping {
            let earliest = timers.allSatisfy { $0.deadline > deadline }
            timers.append(Timer(deadline: deadline, token: token, action: action))
            if earliest {
                // The timekeeper waits for a later deadline, or nobody keeps time. On one of
                // these threads nobody need wake: the driver arming it parks or goes round,
                // and this thread keeps time when it is back in its loop (or, if it finds a job
                // to run first, wakes an idle thread to keep it; see `loop`).
                if let t = timekeeper {
                    wake(t)
                } else if !Self.isCurrentThread(of: self), let s = idle.popLast() {
                    wake(s)
                }
            }
        }
        unlock()
        return token
    }

    /// Removes a timer armed with `arm(at:_:)`. True if it was removed before it fired (its
    /// action will never run); false if it has fired (its action runs or ran) or was dropped
    /// at `stop()`.
    func disarm(_ token: UInt64) -> Bool {
        lock()
        defer { unlock() }
        guard let i = timers.firstIndex(where: { $0.token == token }) else { return false }
        timers.remove(at: i)
        return true
    }

    /// Under the mutex.
    private func wake(_ slot: Slot) {
        slot.signaled = true
        pthread_cond_signal(slot.cond)
    }

    /// Under the mutex: wakes an idle thread for a queued job (the timekeeper only when no
    /// other thread is idle: it takes the job and hands the timer on).
    private func wakeOne() {
        if let s = idle.popLast() {
            wake(s)
        } else if let t = timekeeper, !t.signaled {
            wake(t)
        }
    }

    private func loop(_ slot: Slot, index: Int) {
        pthread_setspecific(Self.slotKey, Unmanaged.passUnretained(slot).toOpaque())
        #if !canImport(Darwin)
        // Named so that top -H and perf show which threads are the scheduler's (Linux takes
        // 15 bytes at most). `pthread_setname_np` is not exported to Swift here; this is
        // what it does for the calling thread.
        let fd = open("/proc/thread-self/comm", O_WRONLY)
        if fd >= 0 {
            let bytes = Array(String("\(name)-\(index)".prefix(15)).utf8)
            _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            close(fd)
        }
        #endif
        let me = asUnownedTaskExecutor()
        lock()
        while true {
            if !timers.isEmpty {
                let t = now()
                if timers.contains(where: { $0.deadline <= t }) {
                    var due: [Timer] = []
                    timers.removeAll { timer in
                        guard timer.deadline <= t else { return false }
                        due.append(timer)
                        return true
                    }
                    // Earliest first (several can be due at once when the thread woke late).
                    let actions = due.sorted { ($0.deadline, $0.token) < ($1.deadline, $1.token) }.map(\.action)
                    unlock()
                    // A single action hands over to one task (the driver), which runs next here.
                    slot.lazy = actions.count == 1
                    for a in actions { a() }
                    slot.lazy = false
                    lock()
                    continue
                }
            }
            if head < jobs.count {
                let job = jobs[head]
                head += 1
                if head == jobs.count {
                    jobs.removeAll(keepingCapacity: true)
                    head = 0
                } else if head >= 1024 && head * 2 >= jobs.count {
                    jobs.removeFirst(head)
                    head = 0
                }
                // A job may run long: a timer nobody keeps time for gets an idle thread.
                if timekeeper == nil && !timers.isEmpty, let s = idle.popLast() { wake(s) }
                unlock()
                job.runSynchronously(on: me)
                lock()
                continue
            }
            if stopping { break }
            if timekeeper == nil, let earliest = timers.map(\.deadline).min() {
                timekeeper = slot
                let (difference, overflow) = earliest.subtractingReportingOverflow(now())
                // At most a day per wait (the loop then looks again): no overflow below.
                let wait = overflow ? 86_400_000_000_000 : Swift.min(difference, 86_400_000_000_000)
                if wait > 0 {
                    var ts = timespec()
                    #if canImport(Darwin)
                    ts.tv_sec = Int(wait / 1_000_000_000)
                    ts.tv_nsec = Int(wait % 1_000_000_000)
                    // One call: a spurious return goes round the loop, which measures again.
                    if !slot.signaled { _ = pthread_cond_timedwait_relative_np(slot.cond, mutex, &ts) }
                    #else
                    clock_gettime(CLOCK_MONOTONIC, &ts)
                    let nsec = Int64(ts.tv_nsec) + wait % 1_000_000_000
                    ts.tv_sec += Int(wait / 1_000_000_000 + nsec / 1_000_000_000)
                    ts.tv_nsec = Int(nsec % 1_000_000_000)
                    while !slot.signaled {
                        if pthread_cond_timedwait(slot.cond, mutex, &ts) == ETIMEDOUT { break }
                    }
                    #endif
                }
                slot.signaled = false
                if timekeeper === slot { timekeeper = nil }
            } else {
                idle.append(slot)
                while !slot.signaled { pthread_cond_wait(slot.cond, mutex) }
                slot.signaled = false
            }
        }
        running -= 1
        var done: [UnsafeContinuation<Void, Never>] = []
        if running == 0 {
            done = stopped
            stopped = []
        }
        unlock()
        pthread_setspecific(Self.slotKey, nil)
        for c in done { c.resume() }
    }
}

/// What a new thread is handed.
private final class ThreadStart {
    let threads: SchedulerThreads
    let slot: SchedulerThreads.Slot
    let index: Int
    init(threads: SchedulerThreads, slot: SchedulerThreads.Slot, index: Int) {
        self.threads = threads
        self.slot = slot
        self.index = index
    }
}
