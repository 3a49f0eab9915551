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
/// it without a query (a burst of clients back after a restart asks once); otherwise one query
/// at a time, on a turn of its own (never behind a snapshot), and a cursor is refused only on
/// an answer to a query begun after it was asked.
final class WALCheck: Sendable {
    private let known = Mutex<LSN?>(nil)
    private let gate = AsyncGate(permits: 1)

    /// The WAL position: one at or past `lsn` when known or found, else a position read after
    /// this call began (below `lsn`). Nil when the calling task was cancelled while waiting.
    func position(reaching lsn: LSN, ask: @Sendable () async throws -> LSN) async throws -> LSN? {
        if let k = known.withLock({ $0 }), k >= lsn { return k }
        guard await gate.enter() else { return nil }
        defer { gate.leave() }
        // A query that ended while this call waited its turn may settle it.
        if let k = known.withLock({ $0 }), k >= lsn { return k }
        let wal = try await ask()
        known.withLock { $0 = Swift.max($0 ?? wal, wal) }
        return wal
    }
}
