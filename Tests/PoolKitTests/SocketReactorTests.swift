#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Foundation
import Synchronization
import Testing
@testable import PoolKit

/// A task executor with one thread of its own: a test can block that thread (a wait
/// "preempted" between its steps) without taking one of the cooperative pool's few threads.
private final class OwnThreadExecutor: TaskExecutor, @unchecked Sendable {
    // @unchecked: `jobs` and `stopped` are guarded by `condition`.
    private let condition = NSCondition()
    private var jobs: [UnownedJob] = []
    private var stopped = false

    init() {
        let thread = Thread { [self] in
            while true {
                condition.lock()
                while jobs.isEmpty && !stopped { condition.wait() }
                if jobs.isEmpty { condition.unlock(); return }
                let job = jobs.removeFirst()
                condition.unlock()
                job.runSynchronously(on: asUnownedTaskExecutor())
            }
        }
        thread.start()
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        condition.lock()
        jobs.append(job)
        condition.signal()
        condition.unlock()
    }

    /// Ends the thread once its queue is empty.
    func stop() {
        condition.lock()
        stopped = true
        condition.signal()
        condition.unlock()
    }
}

/// A connected pair of Unix stream sockets; the caller closes both.
private func socketPair() throws -> (Int32, Int32) {
    var fds: [Int32] = [-1, -1]
    let rc = socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds)
    try #require(rc == 0, "socketpair failed: errno \(errno)")
    return (fds[0], fds[1])
}

/// Returns once `condition` holds; fails the test after 10 s.
private func until(_ what: String, _ condition: () -> Bool) async throws {
    let deadline = ContinuousClock.now + .seconds(10)
    while !condition() {
        try #require(ContinuousClock.now < deadline, "timed out waiting until \(what)")
        try await Task.sleep(for: .milliseconds(1))
    }
}

@Suite("SocketReactor: a socket number reused by another connection is never waited on, interrupted or released for the old one")
struct SocketReactorTests {
    let reactor = SocketReactor.shared

    @Test("once released and closed, its number claimed by another connection: the old claim's wait ends at once, its interrupt and release leave the new owner's wait alone")
    func staleClaims() async throws {
        let (a, aPeer) = try socketPair()
        let old = reactor.claim(fd: a)
        // The old connection closes: released, then its socket closed.
        reactor.release(old)
        // The number now names another socket (dup2 closes the old one and reuses its number
        // in one step, as the next open of the process would, without a race with other tests).
        let (b, bPeer) = try socketPair()
        try #require(dup2(b, a) == a)
        defer { close(a); close(b); close(bPeer); close(aPeer) }
        let new = reactor.claim(fd: a)
        // A wait of the old owner (a listener or reader that decided to wait just before the
        // close) does not register on the new socket: it ends at once.
        let stale = try await withTimeout(.seconds(10)) { await SocketReactor.shared.wait(old, for: .readable) }
        #expect(stale == .interrupted)
        // The new owner's wait survives the old owner's interrupt and release, and ends by
        // its own socket's readiness.
        let waiting = Task { await SocketReactor.shared.wait(new, for: .readable) }
        try await Task.sleep(for: .milliseconds(50))   // let it register (a later one only makes the test weaker)
        reactor.interrupt(old)
        reactor.release(old)
        var byte: UInt8 = 1
        #expect(write(bPeer, &byte, 1) == 1)
        let outcome = try await withTimeout(.seconds(10)) { await waiting.value }
        #expect(outcome == .ready, "the new owner's wait was ended by the old owner's interrupt or release")
        reactor.release(new)
    }

    @Test("a wait registered by another wait's repair before its own epoll_ctl, woken by its event, then a newer wait registered: its own late epoll_ctl does not leave its interest and id in place of the newer wait's (which would never wake)")
    func repairedWaitsLateRegistration() async throws {
        let (a, aPeer) = try socketPair()
        defer { close(a); close(aPeer) }
        let socket = reactor.claim(fd: a)
        defer { reactor.release(socket) }
        // Waits stop on their own thread between publishing and epoll_ctl when told to.
        let published = Mutex<[UInt64]>([])
        let gates = Mutex<[Int: DispatchSemaphore]>([0: DispatchSemaphore(value: 0), 1: DispatchSemaphore(value: 0)])
        SocketReactor.beforeRegistering.withLock {
            $0[a] = { id in
                let index = published.withLock { $0.append(id); return $0.count - 1 }
                gates.withLock { $0[index] }?.wait()
            }
        }
        defer { _ = SocketReactor.beforeRegistering.withLock { $0.removeValue(forKey: a) } }
        let first = OwnThreadExecutor(), second = OwnThreadExecutor()
        defer { first.stop(); second.stop() }
        // 1. Wait Z (readable) is published; its thread stops before its epoll_ctl.
        let z = Task(executorPreference: first) { await SocketReactor.shared.wait(socket, for: .readable) }
        try await until("Z is published") { published.withLock { $0.count } == 1 }
        // 2. Z is ended early (a statement's kick, a status tick).
        reactor.interrupt(socket)
        // 3. Wait W (writable) is published by another task; its thread stops likewise.
        let w = Task(executorPreference: second) { await SocketReactor.shared.wait(socket, for: .writable) }
        try await until("W is published") { published.withLock { $0.count } == 2 }
        // 4. Z's epoll_ctl lands, and Z repairs W's registration: W's event (the socket is
        //    writable) ends W before W's own epoll_ctl has run.
        gates.withLock { $0[0] }?.signal()
        #expect(await z.value == .interrupted)
        try await until("W is woken by its event") { reactor.pendingWait(fd: a) == nil }
        // 5. A newer wait W2 (readable) registers.
        let w2 = Task { await SocketReactor.shared.wait(socket, for: .readable) }
        try await until("W2 is published") { published.withLock { $0.count } == 3 }
        // 6. W's late epoll_ctl lands.
        gates.withLock { $0[1] }?.signal()
        #expect(await w.value == .ready)
        // 7. The socket becomes readable: W2 wakes.
        var byte: UInt8 = 1
        #expect(write(aPeer, &byte, 1) == 1)
        let woke = Mutex(false)
        let watchdog = Task {
            try await Task.sleep(for: .seconds(3))
            if !woke.withLock({ $0 }) { reactor.interrupt(socket) }   // unstick it, and fail below
        }
        let outcome = await w2.value
        woke.withLock { $0 = true }
        watchdog.cancel()
        #expect(outcome == .ready, "W2 slept on a registration W's late epoll_ctl replaced")
    }

    @Test("a socket the epoll set refuses (ENOSPC: fs.epoll.max_user_watches is reached): the wait polls instead, and meanwhile an interrupt or a cancellation ends it at once and no other wait takes the socket")
    func refusedRegistrationPolls() async throws {
        let (a, aPeer) = try socketPair()
        defer { close(a); close(aPeer) }
        let socket = reactor.claim(fd: a)
        defer { reactor.release(socket) }
        defer { _ = SocketReactor.refuseRegistering.withLock { $0.removeValue(forKey: a) } }
        // Polled: it ends .ready after the poll interval (libpq then looks for itself).
        SocketReactor.refuseRegistering.withLock { $0[a] = (ENOSPC, .milliseconds(10)) }
        #expect(try await withTimeout(.seconds(10)) { await SocketReactor.shared.wait(socket, for: .readable) } == .ready)
        // A long poll interval: what ends the wait is the interrupt or the cancellation.
        SocketReactor.refuseRegistering.withLock { $0[a] = (ENOSPC, .seconds(20)) }
        func pending() async throws { try await until("the wait is published") { reactor.pendingWait(fd: a) != nil } }
        let interrupted = Task { await SocketReactor.shared.wait(socket, for: .readable) }
        try await pending()
        #expect(await SocketReactor.shared.wait(socket, for: .readable) == .interrupted, "a second wait took the socket")
        reactor.interrupt(socket)
        #expect(try await withTimeout(.seconds(5)) { await interrupted.value } == .interrupted)
        let cancelled = Task { await SocketReactor.shared.wait(socket, for: .readable) }
        try await pending()
        cancelled.cancel()
        #expect(try await withTimeout(.seconds(5)) { await cancelled.value } == .cancelled)
    }

    @Test("a wait whose recheck finds work already there ends with .interrupted instead of sleeping on the socket")
    func recheckBeforeSleeping() async throws {
        let (a, aPeer) = try socketPair()
        defer { close(a); close(aPeer) }
        let socket = reactor.claim(fd: a)
        defer { reactor.release(socket) }
        let outcome = try await withTimeout(.seconds(10)) { await SocketReactor.shared.wait(socket, for: .readable, recheck: { true }) }
        #expect(outcome == .interrupted)
    }
}
