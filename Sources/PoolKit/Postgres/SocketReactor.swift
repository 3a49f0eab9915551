#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Dispatch
import CLibPQ
import Synchronization

/// What a waiter on a socket wants to hear about.
enum SocketInterest: Sendable {
    case readable
    case writable
    /// Either: while output is stuck (`PQflush` returned 1), libpq must also read, since the
    /// server may be blocked sending to us.
    case readableOrWritable
}

/// How a wait on a socket ended.
enum SocketWaitOutcome: Sendable {
    /// The socket is ready (or in error/hang-up state, which libpq will report on its next call).
    case ready
    /// The calling Task was cancelled while waiting.
    case cancelled
    /// Another party asked the waiter to step aside (`interrupt(fd:)`).
    case interrupted
}

/// PoolKit's reactor: a few threads that wait on socket readiness with one shared `epoll` set
/// for every libpq connection in the process, and that also run the jobs of tasks preferring
/// them (``PostgresConnection/preferredExecutor``).
///
/// Why dedicated threads and not `DispatchSource`: libpq is driven in non-blocking mode, and
/// every wait is one-shot (wait, then call libpq until it would block again). `EPOLLONESHOT`
/// registrations cost one `epoll_ctl` per wait and resume the waiting continuation directly,
/// with no dispatch queue in between; dispatch sources on Linux are themselves built on an
/// epoll thread plus a queue hop, and must be suspended/resumed and cancelled with care around
/// `close()`. Nothing here ever blocks a Swift concurrency thread: only reactor threads sleep
/// in `epoll_wait`.
///
/// Why more than one thread (``threadCount``, default 2): a query's send wakes its server
/// backend, which on a busy machine often preempts the sending thread; with one thread every
/// connection's progress stops with it. `pgbench -j 1` against `-j 2` shows the same effect
/// (about 0.6x on this project's 2-core machine). The threads share one epoll set (each
/// one-shot event reaches one thread) and one job queue; an idle thread sleeps in
/// `epoll_wait` and is woken through an `eventfd` when a job arrives from outside.
final class SocketReactor: TaskExecutor, Sendable {
    /// The process-wide reactor, started on first use. It lives as long as the process (a
    /// documented root: its threads are the one unstructured execution context PoolKit owns).
    static let shared = SocketReactor(threads: SocketReactor.configuredThreadCount())

    /// How many reactor threads the shared reactor runs: `POOLKIT_REACTOR_THREADS` (1-64) if
    /// set, else 2 (1 on a single-core machine).
    /// An unusable value is reported on standard error, naming the variable, and ignored.
    static func configuredThreadCount() -> Int {
        let fallback = sysconf(Int32(_SC_NPROCESSORS_ONLN)) > 1 ? 2 : 1
        guard let raw = getenv("POOLKIT_REACTOR_THREADS") else { return fallback }
        let text = String(cString: raw)
        if let n = Int(text), (1...64).contains(n) { return n }
        let message = Array("PoolKit: POOLKIT_REACTOR_THREADS=\(text) is not a number from 1 to 64; using \(fallback) reactor threads\n".utf8)
        _ = message.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
        return fallback
    }

    private struct Waiter {
        var id: UInt64
        var continuation: CheckedContinuation<SocketWaitOutcome, Never>
    }

    private struct State {
        var waiters: [Int32: Waiter] = [:]
        /// fds currently known to the epoll set (registered and not yet removed).
        var registered: Set<Int32> = []
    }

    /// Number of reactor threads.
    let threadCount: Int
    private let epollFD: Int32
    /// Wakes a sleeping reactor thread when a job is enqueued.
    private let wakeFD: Int32
    /// Jobs of tasks that prefer this executor (see `PostgresConnection.preferredExecutor`).
    private let jobs = Mutex(FIFOQueue<UnownedJob>())
    /// Reactor threads that are (about to be) asleep in `epoll_wait`.
    private let sleepers = Atomic<Int>(0)
    /// True from a wake-up write until a reactor thread has read the eventfd.
    private let wakePending = Atomic<Bool>(false)
    /// Marks reactor threads (a non-nil value), to enqueue from them without a wake-up.
    private let threadKey: pthread_key_t
    /// Held only for dictionary updates, never across a system call: every statement that
    /// waits and the reactor threads take it, so a syscall inside it makes them spin.
    private let state = Mutex(State())
    private let nextID = Atomic<UInt64>(0)

    private init(threads: Int) {
        threadCount = threads
        epollFD = epoll_create1(Int32(EPOLL_CLOEXEC))
        precondition(epollFD >= 0, "epoll_create1 failed: errno \(errno)")
        wakeFD = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        precondition(wakeFD >= 0, "eventfd failed: errno \(errno)")
        var key = pthread_key_t()
        precondition(pthread_key_create(&key, nil) == 0, "pthread_key_create failed")
        threadKey = key
        var ev = epoll_event()
        // Edge-triggered: one write wakes one sleeping thread, not every thread in epoll_wait
        // (the thread that gets it reads the counter back to zero).
        ev.events = UInt32(EPOLLIN.rawValue) | UInt32(EPOLLET.rawValue)
        ev.data.fd = wakeFD
        precondition(epoll_ctl(epollFD, EPOLL_CTL_ADD, wakeFD, &ev) == 0, "epoll_ctl(eventfd) failed: errno \(errno)")
        let fd = epollFD
        for index in 1...threads {
            let thread = ReactorThread { [unowned self] in self.loop(epollFD: fd, index: index) }
            thread.start()
        }
    }

    /// True when the calling thread is one of this reactor's threads.
    var isCurrentThreadReactor: Bool { pthread_getspecific(threadKey) != nil }

    /// Waits until `fd` is readable or writable. Cancellation of the calling Task ends the wait
    /// with `.cancelled` when `cancellable` is true; otherwise the wait ignores cancellation.
    nonisolated(nonsending)
    func wait(fd: Int32, for interest: SocketInterest, cancellable: Bool = true) async -> SocketWaitOutcome {
        if cancellable && Task.isCancelled { return .cancelled }
        let id = nextID.add(1, ordering: .relaxed).newValue
        if !cancellable {
            return await withCheckedContinuation { cont in
                self.arm(fd: fd, interest: interest, waiter: Waiter(id: id, continuation: cont))
            }
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { cont in
                self.arm(fd: fd, interest: interest, waiter: Waiter(id: id, continuation: cont))
                // A cancellation between the check above and the handler's installation ran
                // `onCancel` before the waiter existed, which then found nothing to end: look
                // again now that it is published (`resume` ends it at most once).
                if Task.isCancelled { self.resume(fd: fd, id: id, with: .cancelled) }
            }
        } onCancel: {
            self.resume(fd: fd, id: id, with: .cancelled)
        }
    }

    /// Ends a pending wait on `fd` (if any) with `.interrupted`.
    func interrupt(fd: Int32) {
        resume(fd: fd, id: nil, with: .interrupted)
    }

    /// Removes `fd` from the epoll set before its owner closes it. Any pending wait ends with
    /// `.interrupted`.
    func forget(fd: Int32) {
        let waiter = state.withLock { s -> Waiter? in
            if s.registered.remove(fd) != nil {
                var ev = epoll_event()
                _ = epoll_ctl(epollFD, EPOLL_CTL_DEL, fd, &ev)
            }
            return s.waiters.removeValue(forKey: fd)
        }
        waiter?.continuation.resume(returning: .interrupted)
    }

    private func arm(fd: Int32, interest: SocketInterest, waiter: Waiter) {
        // Publish the waiter first, then arm the (one-shot) registration outside the lock: an
        // event can only arrive after the arm, and it finds the waiter in place.
        let op: Int32? = state.withLock { s in
            if s.waiters[fd] != nil {
                // One waiter per socket: a libpq connection is used by one task at a time.
                return nil
            }
            s.waiters[fd] = waiter
            return s.registered.insert(fd).inserted ? EPOLL_CTL_ADD : EPOLL_CTL_MOD
        }
        guard let op else {
            waiter.continuation.resume(returning: .interrupted)
            return
        }
        var ev = epoll_event()
        let base: UInt32 = switch interest {
        case .readable: UInt32(EPOLLIN.rawValue)
        case .writable: UInt32(EPOLLOUT.rawValue)
        case .readableOrWritable: UInt32(EPOLLIN.rawValue) | UInt32(EPOLLOUT.rawValue)
        }
        ev.events = base | UInt32(EPOLLONESHOT.rawValue) | UInt32(EPOLLRDHUP.rawValue)
        ev.data.fd = fd
        var rc = epoll_ctl(epollFD, op, fd, &ev)
        if rc != 0 && op == EPOLL_CTL_MOD && errno == ENOENT {
            // The fd was closed and its number reused: register it anew.
            rc = epoll_ctl(epollFD, EPOLL_CTL_ADD, fd, &ev)
        } else if rc != 0 && op == EPOLL_CTL_ADD && errno == EEXIST {
            rc = epoll_ctl(epollFD, EPOLL_CTL_MOD, fd, &ev)
        }
        if rc != 0 {
            // A bad fd: let libpq discover and report the broken connection.
            let mine = state.withLock { s -> Waiter? in
                s.registered.remove(fd)
                guard let w = s.waiters[fd], w.id == waiter.id else { return nil }
                s.waiters[fd] = nil
                return w
            }
            mine?.continuation.resume(returning: .ready)
        }
    }

    private func resume(fd: Int32, id: UInt64?, with outcome: SocketWaitOutcome) {
        let waiter = state.withLock { s -> Waiter? in
            guard let w = s.waiters[fd], id == nil || w.id == id else { return nil }
            s.waiters[fd] = nil
            return w
        }
        waiter?.continuation.resume(returning: outcome)
    }

    /// Runs a job of a task that prefers this executor on a reactor thread.
    func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        let queued = jobs.withLock { q in
            q.append(unowned)
            return q.count
        }
        // Wake a sleeping thread, except for a single job queued by a reactor thread while it
        // drains epoll events: it runs the queue itself right after. A job queued from inside
        // a running job (a pool handing a connection to the next task) wakes a sleeper, so the
        // two run in parallel.
        if sleepers.load(ordering: .sequentiallyConsistent) > 0,
           queued > 1 || Int(bitPattern: pthread_getspecific(threadKey)) != Self.drainingEvents,
           !wakePending.exchange(true, ordering: .acquiringAndReleasing) {
            var one: UInt64 = 1
            if write(wakeFD, &one, 8) != 8 {
                // Cannot happen with an eventfd short of overflow; do not leave the flag stuck.
                wakePending.store(false, ordering: .releasing)
            }
        }
    }

    /// Thread-specific markers of a reactor thread: draining epoll events, or running a job.
    private static let drainingEvents = 1
    private static let runningJob = 2

    private func loop(epollFD: Int32, index: Int) {
        pthread_setspecific(threadKey, UnsafeRawPointer(bitPattern: Self.drainingEvents))
        // Named so that top -H, perf and debuggers show which threads are PoolKit's. Linux takes
        // 15 bytes at most (a longer name is refused, leaving the thread unnamed): threads 10
        // and up (POOLKIT_REACTOR_THREADS goes to 64) drop the dash.
        _ = pthread_setname_np(pthread_self(), index < 10 ? "poolkit-react-\(index)" : "poolkit-react\(index)")
        let capacity = 64
        let events = UnsafeMutablePointer<epoll_event>.allocate(capacity: capacity)
        defer { events.deallocate() }
        let me = asUnownedTaskExecutor()
        while true {
            // Run queued jobs, a bounded number before looking at the sockets again.
            var ran = 0
            if let first = jobs.withLock({ $0.popFirst() }) {
                pthread_setspecific(threadKey, UnsafeRawPointer(bitPattern: Self.runningJob))
                var job: UnownedJob? = first
                while let next = job {
                    next.runSynchronously(on: me)
                    ran += 1
                    job = ran < 64 ? jobs.withLock { $0.popFirst() } : nil
                }
                pthread_setspecific(threadKey, UnsafeRawPointer(bitPattern: Self.drainingEvents))
            }
            // Announce the sleep before the last look at the queue (pairs with enqueue's check).
            sleepers.add(1, ordering: .sequentiallyConsistent)
            let idle = jobs.withLock { $0.isEmpty }
            let n = epoll_wait(epollFD, events, Int32(capacity), idle ? -1 : 0)
            sleepers.subtract(1, ordering: .sequentiallyConsistent)
            if n < 0 {
                if errno == EINTR { continue }
                fatalError("epoll_wait failed: errno \(errno)")
            }
            for i in 0..<Int(n) {
                let fd = events[i].data.fd
                if fd == wakeFD {
                    var value: UInt64 = 0
                    _ = read(wakeFD, &value, 8)
                    wakePending.store(false, ordering: .releasing)
                } else {
                    resume(fd: fd, id: nil, with: .ready)
                }
            }
        }
    }
}

/// A plain pthread for the reactor loop (not a Swift concurrency thread).
private final class ReactorThread: Sendable {
    private let body: @Sendable () -> Void

    init(body: @escaping @Sendable () -> Void) { self.body = body }

    func start() {
        var tid = pthread_t()
        let unmanaged = Unmanaged.passRetained(self)
        let rc = pthread_create(&tid, nil, { arg in
            let me = Unmanaged<ReactorThread>.fromOpaque(arg!).takeRetainedValue()
            me.body()
            return nil
        }, unmanaged.toOpaque())
        precondition(rc == 0, "could not start the PoolKit reactor thread: \(rc)")
        pthread_detach(tid)
    }
}

/// Runs blocking work (DNS in libpq's connect, `PQcancel`) on Dispatch threads, never on the
/// Swift concurrency pool.
///
/// Four serial queues, used round robin: serial queues get their own (overcommit) threads, so
/// blocking work never waits for the width-limited global pool that other code (a test runner,
/// `EmbeddedPostgres`, user code) may have filled with blocking calls.
enum BlockingExecutor {
    /// Runs `body` off the cooperative pool and returns its result. Each call gets a serial
    /// queue of its own (Dispatch gives it a thread when it needs one): a call that blocks for
    /// minutes (a name lookup, a cancel request to an unreachable host) must not hold up the
    /// next connect queued behind it. The calls are connects and cancels, not statements.
    static func run<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { cont in
            DispatchQueue(label: "PoolKit.blocking").async { cont.resume(returning: body()) }
        }
    }
}
