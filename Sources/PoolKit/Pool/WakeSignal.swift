import Synchronization

/// A wake-up for one waiting task at a time: `signal()` resumes the waiter, or,
/// if none waits, makes the next `wait()` return at once. Cancellation ends a wait.
final class WakeSignal: Sendable {
    private struct State {
        var pending = false
        var waiter: CheckedContinuation<Void, Never>?
    }

    private let state = Mutex(State())

    /// Wakes the waiter (or the next one).
    func signal() {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            if let waiter = s.waiter {
                s.waiter = nil
                return waiter
            }
            s.pending = true
            return nil
        }
        waiter?.resume()
    }

    /// Waits for a signal or for cancellation.
    func wait() async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLock { s -> Bool in
                    if s.pending {
                        s.pending = false
                        return true
                    }
                    if Task.isCancelled { return true }
                    s.waiter = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
                defer { s.waiter = nil }
                return s.waiter
            }
            waiter?.resume()
        }
    }
}

/// A one-time event any number of tasks can wait for: `fire()` resumes every waiter, and
/// every later `wait()` returns at once. Cancellation ends a wait.
final class OneTimeEvent: Sendable {
    private struct State {
        var fired = false
        var nextID: UInt64 = 0
        var waiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
    }

    private let state = Mutex(State())

    /// Whether the event has fired.
    var hasFired: Bool { state.withLock { $0.fired } }

    /// Fires the event (idempotent).
    func fire() {
        let waiters = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.fired = true
            defer { s.waiters = [:] }
            return Array(s.waiters.values)
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Waits until the event fires or `limit` has passed; true if it fired. The caller's
    /// cancellation does not end the wait early (it is bounded anyway): a cancelled caller
    /// that must still wait for a cleanup to go out can use it.
    func wait(atMost limit: Duration) async -> Bool {
        if hasFired { return true }
        // Unstructured: child tasks of a cancelled caller would end their waits at once.
        let done = OneTimeEvent()
        let watcher = Task {
            await self.wait()
            done.fire()
        }
        let timer = Task {
            try? await Task.sleep(for: limit.sleepable)
            done.fire()
        }
        await Task { await done.wait() }.value
        watcher.cancel()
        timer.cancel()
        return hasFired
    }

    /// Waits until the event fires or the task is cancelled.
    func wait() async {
        let id = state.withLock { s -> UInt64 in
            s.nextID += 1
            return s.nextID
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLock { s -> Bool in
                    if s.fired || Task.isCancelled { return true }
                    s.waiters[id] = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            let waiter = state.withLock { $0.waiters.removeValue(forKey: id) }
            waiter?.resume()
        }
    }
}
