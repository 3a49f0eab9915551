#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import PoolKit

/// A connected pair of Unix stream sockets; the caller closes both.
private func socketPair() throws -> (Int32, Int32) {
    var fds: [Int32] = [-1, -1]
    let rc = socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds)
    try #require(rc == 0, "socketpair failed: errno \(errno)")
    return (fds[0], fds[1])
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
