import Synchronization

/// A counting gate for async callers: at most `permits` hold it at once; the others wait in
/// arrival order. Cancelling a waiter ends its wait with `false` (it holds nothing then).
/// The server uses one to bound concurrent snapshots, so that clients cannot take every
/// pooled connection the service's own jobs need.
final class AsyncGate: Sendable {
    private struct State {
        var permits: Int
        var waiters: [(id: UInt64, continuation: CheckedContinuation<Bool, Never>)] = []
        var nextID: UInt64 = 0
    }

    private let state: Mutex<State>

    init(permits: Int) {
        state = Mutex(State(permits: max(1, permits)))
    }

    /// Waits for a permit; true once held (give it back with `leave()`), false if the calling
    /// task was cancelled first.
    func enter() async -> Bool {
        let id = state.withLock { s -> UInt64 in
            s.nextID &+= 1
            return s.nextID
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
                let answer = state.withLock { s -> Bool? in
                    if Task.isCancelled { return false }
                    if s.permits > 0 && s.waiters.isEmpty {
                        s.permits -= 1
                        return true
                    }
                    s.waiters.append((id, continuation))
                    return nil
                }
                if let answer { continuation.resume(returning: answer) }
            }
        } onCancel: {
            let waiter = state.withLock { s -> CheckedContinuation<Bool, Never>? in
                guard let index = s.waiters.firstIndex(where: { $0.id == id }) else { return nil }
                return s.waiters.remove(at: index).continuation
            }
            waiter?.resume(returning: false)
        }
    }

    /// Waits for a permit at most `limit`: true once held (give it back with `leave()`), false
    /// if the calling task was cancelled first, nil when `limit` passed first.
    func enter(within limit: Duration) async -> Bool? {
        await withTaskGroup(of: Bool?.self) { group in
            group.addTask { await self.enter() }
            group.addTask {
                try? await Task.sleep(for: limit)
                return nil
            }
            let first = await group.next() ?? false
            group.cancelAll()
            if let entered = first { return entered }
            // The limit passed: the wait is cancelled; a permit it got meanwhile goes back.
            if await group.next() == true { leave() }
            return Task.isCancelled ? false : nil
        }
    }

    /// Gives a permit back: to the longest waiter, if any.
    func leave() {
        let next = state.withLock { s -> CheckedContinuation<Bool, Never>? in
            if s.waiters.isEmpty {
                s.permits += 1
                return nil
            }
            return s.waiters.removeFirst().continuation
        }
        next?.resume(returning: true)
    }

    /// Permits free and callers waiting (for statistics and tests).
    var counts: (free: Int, waiting: Int) { state.withLock { ($0.permits, $0.waiters.count) } }
}

/// Answers "has the database's WAL reached this `since` cursor?" with as few queries as
/// possible: positions only grow, so the highest answer seen settles every cursor at or below
/// it without a query (a burst of clients back after a restart asks once). Otherwise callers
/// share queries: one runs at a time, and its answer, or its failure, goes to every caller
/// that asked before it began; those that asked meanwhile share the next one (so a cursor is
/// refused only on an answer to a query begun after it was asked), unless the answer just
/// received already settles them. A slow or failing database costs a burst two queries' time,
/// not one per caller.
final class WALCheck: Sendable {
    private typealias Waiter = (lsn: LSN, continuation: CheckedContinuation<Result<LSN, any Error>, Never>)
    private struct State {
        var known: LSN?
        var running = false
        /// Callers for the next query.
        var waiting: [Waiter] = []
    }
    private let state = Mutex(State())

    /// The WAL position: one at or past `lsn` when known or found, else a position read by a
    /// query begun after this call (below `lsn`). Throws what that query threw.
    func position(reaching lsn: LSN, ask: @escaping @Sendable () async throws -> LSN) async throws -> LSN {
        if let known = state.withLock({ $0.known }), known >= lsn { return known }
        let result = await withCheckedContinuation { (continuation: CheckedContinuation<Result<LSN, any Error>, Never>) in
            let start = state.withLock { s -> Bool in
                s.waiting.append((lsn, continuation))
                if s.running { return false }
                s.running = true
                return true
            }
            // Owned by the callers: it ends once no caller waits.
            if start { Task { await self.runQueries(ask) } }
        }
        return try result.get()
    }

    private func runQueries(_ ask: @Sendable () async throws -> LSN) async {
        while true {
            let round = state.withLock { s -> [Waiter] in
                defer { s.waiting = [] }
                return s.waiting
            }
            let result: Result<LSN, any Error>
            do { result = .success(try await ask()) } catch { result = .failure(error) }
            let settled = state.withLock { s -> [Waiter] in
                guard case .success(let wal) = result else { return [] }
                s.known = Swift.max(s.known ?? wal, wal)
                // Those who asked meanwhile and whose cursor this answer reaches need no query.
                let reached = s.waiting.filter { $0.lsn <= wal }
                s.waiting.removeAll { $0.lsn <= wal }
                return reached
            }
            for waiter in round { waiter.continuation.resume(returning: result) }
            for waiter in settled { waiter.continuation.resume(returning: result) }
            let more = state.withLock { s -> Bool in
                if s.waiting.isEmpty { s.running = false }
                return s.running
            }
            if !more { return }
        }
    }
}
