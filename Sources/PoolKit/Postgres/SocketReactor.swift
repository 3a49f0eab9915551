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

/// A connection's socket as the reactor knows it: the number, and the claim that made it
/// this connection's (``SocketReactor/claim(fd:)``). Socket numbers are reused as soon as they
/// are closed: a wait, an interrupt or a release with a claim that is no longer the number's
/// does nothing to the socket's new owner.
struct ReactorSocket: Sendable, Equatable {
    /// The file descriptor (-1: none).
    let fd: Int32
    /// The claim (0: none).
    let token: UInt64

    /// No socket.
    static let none = ReactorSocket(fd: -1, token: 0)
}

/// How a wait on a socket ended.
enum SocketWaitOutcome: Sendable {
    /// The socket is ready (or in error/hang-up state, which libpq will report on its next call).
    case ready
    /// The calling Task was cancelled while waiting.
    case cancelled
    /// Another party asked the waiter to step aside (`interrupt(_:)`), the socket was released
    /// (`release(_:)`), or its number was claimed by another connection.
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
        var events: UInt32
        var continuation: CheckedContinuation<SocketWaitOutcome, Never>
        /// Registered by another wait's repair (see `arm`) perhaps before its own `epoll_ctl`,
        /// which may then land after a later wait's: an event that ends it counts as an early
        /// end, so that its own check repairs that.
        var armedByOther = false
    }

    private struct State {
        var waiters: [Int32: Waiter] = [:]
        /// fds currently known to the epoll set (registered and not yet removed).
        var registered: Set<Int32> = []
        /// Each claimed socket number's current claim (``claim(fd:)``).
        var owners: [Int32: UInt64] = [:]
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
    /// Held for dictionary updates, and across a system call only on two rare paths (a
    /// release's `EPOLL_CTL_DEL`, and the re-registration after a wait ended early, see
    /// `arm`): every statement that waits and the reactor threads take it.
    private let state = Mutex(State())
    private let nextID = Atomic<UInt64>(0)
    private let nextToken = Atomic<UInt64>(0)
    /// Counts waits ended by anything but their socket's event (interrupt, cancellation, a
    /// claim, a release, a recheck, a failed arm): only such a wait can have its registration
    /// land after a later wait's (see `arm`).
    private let earlyEnds = Atomic<UInt64>(0)

    private init(threads: Int) {
        threadCount = threads
        // Made at the process's first connect; without them no connection can be driven.
        epollFD = epoll_create1(Int32(EPOLL_CLOEXEC))
        precondition(epollFD >= 0, "PoolKit could not create its epoll set (errno \(errno)\(Self.limitHint(errno)))")
        wakeFD = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        precondition(wakeFD >= 0, "PoolKit could not create its eventfd (errno \(errno)\(Self.limitHint(errno)))")
        var key = pthread_key_t()
        precondition(pthread_key_create(&key, nil) == 0, "pthread_key_create failed")
        threadKey = key
        var ev = epoll_event()
        // Edge-triggered: one write wakes one sleeping thread, not every thread in epoll_wait
        // (the thread that gets it reads the counter back to zero).
        ev.events = UInt32(EPOLLIN.rawValue) | UInt32(EPOLLET.rawValue)
        ev.data.u64 = Self.eventData(fd: wakeFD, id: 0)
        precondition(epoll_ctl(epollFD, EPOLL_CTL_ADD, wakeFD, &ev) == 0, "epoll_ctl(eventfd) failed: errno \(errno)")
        let fd = epollFD
        for index in 1...threads {
            let thread = ReactorThread { [unowned self] in self.loop(epollFD: fd, index: index) }
            thread.start()
        }
    }

    /// What to change when a descriptor could not be made: the open-file limit for EMFILE and
    /// ENFILE (errno 24, 23), memory otherwise.
    static func limitHint(_ code: Int32) -> String {
        switch code {
        case EMFILE: ": too many open files in this process; raise its open-file limit (ulimit -n, systemd's LimitNOFILE)"
        case ENFILE: ": too many open files in the system (fs.file-max)"
        case ENOMEM: ": out of memory"
        default: ""
        }
    }

    /// Set once an `epoll_ctl` was refused for want of resources (`fs.epoll.max_user_watches`,
    /// memory): reported once on standard error.
    private let watchLimitReported = Atomic<Bool>(false)

    #if DEBUG
    /// Tests: called on a wait's thread between publishing wait `id` on the socket number and
    /// its `epoll_ctl`, to replay a thread preempted there.
    static let beforeRegistering = Mutex<[Int32: @Sendable (_ id: UInt64) -> Void]>([:])

    /// Tests: `epoll_ctl` for a wait on socket number `fd` fails with this errno, and a wait
    /// that then polls looks again after `pollAfter` (10 ms otherwise).
    static let refuseRegistering = Mutex<[Int32: (code: Int32, pollAfter: DispatchTimeInterval)]>([:])

    /// Tests: the id of the wait pending on socket number `fd`, if any.
    func pendingWait(fd: Int32) -> UInt64? { state.withLock { $0.waiters[fd]?.id } }
    #endif

    /// True when the calling thread is one of this reactor's threads.
    var isCurrentThreadReactor: Bool { pthread_getspecific(threadKey) != nil }

    /// Makes `fd` the caller's: the socket a connection just opened (or found libpq had opened
    /// anew). Later waits, interrupts and the release name the claim; once the number is
    /// released (closed) and claimed by another connection, they do nothing to that one.
    func claim(fd: Int32) -> ReactorSocket {
        guard fd >= 0 else { return .none }
        let token = nextToken.add(1, ordering: .relaxed).newValue
        let stale = state.withLock { s -> Waiter? in
            s.owners[fd] = token
            // A wait of the number's last owner that got in before this claim ends now.
            return endedEarly(s.waiters.removeValue(forKey: fd))
        }
        stale?.continuation.resume(returning: .interrupted)
        return ReactorSocket(fd: fd, token: token)
    }

    /// Waits until `socket` is readable or writable. Cancellation of the calling Task ends the
    /// wait with `.cancelled` when `cancellable` is true; otherwise the wait ignores
    /// cancellation. A socket released meanwhile (closed by another task) ends it at once
    /// with `.interrupted`, also when its number already belongs to another connection.
    ///
    /// `recheck`, if given, is called once the wait is published and before it is armed; true
    /// ends the wait with `.interrupted` (what an `interrupt` landing just before the wait
    /// existed would have done).
    nonisolated(nonsending)
    func wait(_ socket: ReactorSocket, for interest: SocketInterest, cancellable: Bool = true,
              recheck: (@Sendable () -> Bool)? = nil) async -> SocketWaitOutcome {
        if cancellable && Task.isCancelled { return .cancelled }
        let id = nextID.add(1, ordering: .relaxed).newValue
        let fd = socket.fd
        if !cancellable {
            return await withCheckedContinuation { cont in
                self.arm(socket, interest: interest, id: id, continuation: cont, recheck: recheck)
            }
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { cont in
                self.arm(socket, interest: interest, id: id, continuation: cont, recheck: recheck)
                // A cancellation between the check above and the handler's installation ran
                // `onCancel` before the waiter existed, which then found nothing to end: look
                // again now that it is published (`resume` ends it at most once).
                if Task.isCancelled { self.resume(fd: fd, id: id, with: .cancelled) }
            }
        } onCancel: {
            self.resume(fd: fd, id: id, with: .cancelled)
        }
    }

    /// Ends a pending wait on `socket` (if any) with `.interrupted`; nothing if its number
    /// is no longer this claim's.
    func interrupt(_ socket: ReactorSocket) {
        let waiter = state.withLock { s -> Waiter? in
            guard socket.token != 0, s.owners[socket.fd] == socket.token else { return nil }
            return endedEarly(s.waiters.removeValue(forKey: socket.fd))
        }
        waiter?.continuation.resume(returning: .interrupted)
    }

    /// Removes `socket` from the epoll set before its owner closes it; any pending wait ends
    /// with `.interrupted`. Nothing if the number is no longer this claim's (libpq closed it
    /// and another connection has the number now).
    func release(_ socket: ReactorSocket) {
        let waiter = state.withLock { s -> Waiter? in
            guard socket.token != 0, s.owners[socket.fd] == socket.token else { return nil }
            s.owners[socket.fd] = nil
            if s.registered.remove(socket.fd) != nil {
                var ev = epoll_event()
                _ = epoll_ctl(epollFD, EPOLL_CTL_DEL, socket.fd, &ev)
            }
            return endedEarly(s.waiters.removeValue(forKey: socket.fd))
        }
        waiter?.continuation.resume(returning: .interrupted)
    }

    /// Counts `waiter` (if any) as a wait ended by something else than its event. Under the lock.
    private func endedEarly(_ waiter: Waiter?) -> Waiter? {
        if waiter != nil { earlyEnds.add(1, ordering: .releasing) }
        return waiter
    }

    /// An event's data: the socket number and the low 32 bits of the wait's id, so that an
    /// event of an earlier registration does not wake a later wait on the same socket.
    private static func eventData(fd: Int32, id: UInt64) -> UInt64 {
        UInt64(UInt32(bitPattern: fd)) | (id << 32)
    }

    private func arm(_ socket: ReactorSocket, interest: SocketInterest, id: UInt64, continuation: CheckedContinuation<SocketWaitOutcome, Never>,
                     recheck: (@Sendable () -> Bool)? = nil) {
        let fd = socket.fd
        let base: UInt32 = switch interest {
        case .readable: UInt32(EPOLLIN.rawValue)
        case .writable: UInt32(EPOLLOUT.rawValue)
        case .readableOrWritable: UInt32(EPOLLIN.rawValue) | UInt32(EPOLLOUT.rawValue)
        }
        let events = base | UInt32(EPOLLONESHOT.rawValue) | UInt32(EPOLLRDHUP.rawValue)
        // Publish the waiter first, then arm the (one-shot) registration outside the lock: an
        // event can only arrive after the arm, and it finds the waiter in place.
        var endsAtPublish: UInt64 = 0
        let op: Int32? = state.withLock { s in
            // Not (or no longer) this connection's socket: closed by another task, its number
            // perhaps already another connection's. One waiter per socket: a libpq connection
            // is used by one task at a time.
            guard socket.token != 0, s.owners[fd] == socket.token, s.waiters[fd] == nil else { return nil }
            endsAtPublish = earlyEnds.load(ordering: .relaxed)
            s.waiters[fd] = Waiter(id: id, events: events, continuation: continuation)
            return s.registered.insert(fd).inserted ? EPOLL_CTL_ADD : EPOLL_CTL_MOD
        }
        guard let op else {
            continuation.resume(returning: .interrupted)
            return
        }
        if let recheck, recheck() {
            resume(fd: fd, id: id, with: .interrupted)
            return
        }
        #if DEBUG
        Self.beforeRegistering.withLock { $0[fd] }?(id)
        #endif
        #if DEBUG
        var rc = control(fd: fd, op: op, events: events, id: id)
        var pollAfter = DispatchTimeInterval.milliseconds(10)
        if let refusal = Self.refuseRegistering.withLock({ $0[fd] }) { (rc, errno, pollAfter) = (-1, refusal.code, refusal.pollAfter) }
        #else
        let rc = control(fd: fd, op: op, events: events, id: id)
        let pollAfter = DispatchTimeInterval.milliseconds(10)
        #endif
        // A wait ended early (interrupted, cancelled) while its thread was between publishing
        // and registering, followed by a later wait on the same socket, has its registration
        // land after the later one's: it would leave its interest, and its id, in place of the
        // current wait's. So a wait that finds an early end since its publication makes the
        // current waiter's registration again, under the lock (a later wait publishes only
        // after it, so this cannot in turn overwrite a newer one). Otherwise, one atomic load.
        //
        // The current waiter may itself not have registered yet: its own `epoll_ctl` can then
        // land after its event ended it and a newer wait registered. It is marked, and its
        // event counts as an early end, so that its own check finds the change and repairs it.
        if rc == 0, earlyEnds.load(ordering: .acquiring) != endsAtPublish {
            state.withLock { s in
                guard let current = s.waiters[fd], current.id != id else { return }
                s.waiters[fd]?.armedByOther = true
                _ = control(fd: fd, op: EPOLL_CTL_MOD, events: current.events, id: current.id)
            }
        }
        if rc != 0 {
            let code = errno
            let polls = code == ENOSPC || code == ENOMEM
            let mine = state.withLock { s -> Waiter? in
                s.registered.remove(fd)
                guard let w = s.waiters[fd], w.id == id else { return nil }
                // Polling, the wait stays in place: an interrupt, a release or a cancellation
                // ends it at once, and no other wait takes the socket meanwhile.
                if polls { return nil }
                s.waiters[fd] = nil
                return endedEarly(w)
            }
            if polls {
                // The socket is fine, the epoll set is full (the user's fs.epoll.max_user_watches,
                // shared with every epoll instance of the user) or memory is short: ready at once,
                // libpq would find nothing and wait again at once, a core spinning for as long.
                // Looked at again every 10 ms instead, and said once.
                if !watchLimitReported.exchange(true, ordering: .relaxed) {
                    let message = Array("PoolKit: epoll_ctl refused a socket (errno \(code)): raise fs.epoll.max_user_watches (sysctl) or free memory; until then waits poll every 10 ms\n".utf8)
                    _ = message.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
                }
                DispatchQueue.global().asyncAfter(deadline: .now() + pollAfter) {
                    self.resume(fd: fd, id: id, with: .ready)
                }
                return
            }
            // A bad fd: let libpq discover and report the broken connection.
            mine?.continuation.resume(returning: .ready)
        }
    }

    /// `epoll_ctl` for a wait, adding the socket if it was closed and its number reused, and
    /// modifying it if it is already known to the set.
    private func control(fd: Int32, op: Int32, events: UInt32, id: UInt64) -> Int32 {
        var ev = epoll_event()
        ev.events = events
        ev.data.u64 = Self.eventData(fd: fd, id: id)
        var rc = epoll_ctl(epollFD, op, fd, &ev)
        if rc != 0 && op == EPOLL_CTL_MOD && errno == ENOENT {
            // The fd was closed and its number reused: register it anew.
            rc = epoll_ctl(epollFD, EPOLL_CTL_ADD, fd, &ev)
        } else if rc != 0 && op == EPOLL_CTL_ADD && errno == EEXIST {
            rc = epoll_ctl(epollFD, EPOLL_CTL_MOD, fd, &ev)
        }
        return rc
    }

    /// Ends the wait on `fd` with `outcome` if it is wait `id` (any wait when nil). With
    /// `low32`, only the id's low 32 bits are compared (an epoll event's data).
    private func resume(fd: Int32, id: UInt64?, low32: Bool = false, with outcome: SocketWaitOutcome) {
        let waiter = state.withLock { s -> Waiter? in
            guard let w = s.waiters[fd] else { return nil }
            if let id, (low32 ? w.id & 0xFFFF_FFFF : w.id) != id { return nil }
            s.waiters[fd] = nil
            return low32 && !w.armedByOther ? w : endedEarly(w)
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
                let data = events[i].data.u64
                let fd = Int32(bitPattern: UInt32(truncatingIfNeeded: data))
                if fd == wakeFD {
                    var value: UInt64 = 0
                    _ = read(wakeFD, &value, 8)
                    wakePending.store(false, ordering: .releasing)
                } else {
                    resume(fd: fd, id: data >> 32, low32: true, with: .ready)
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
        precondition(rc == 0, "could not start a PoolKit reactor thread (error \(rc)): the process is out of threads or memory (ulimit -u; POOLKIT_REACTOR_THREADS sets how many the reactor starts)")
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
