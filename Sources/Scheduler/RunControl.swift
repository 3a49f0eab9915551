import Synchronization

/// Why a run's task was cancelled.
enum CancelReason: UInt8, Sendable {
    case jobCancelled
    case timeout
    case shutdownPolicy
    case shutdownDeadline
    case schedulerCancelled
}

/// Cancels one run's task from outside it.
///
/// A task group cannot cancel one of its children, and a second task per run
/// (to own a cancellable inner group) would double the cost of every run. So
/// the run's child task installs a closure that cancels *itself*
/// (`UnsafeCurrentTask.cancel()`), and removes it again before it returns.
/// Install, cancel and removal happen under this lock, so the closure is only
/// ever called while the task is alive: that is the lifetime rule
/// `UnsafeCurrentTask` asks callers to keep.
final class RunControl: Sendable {
    private struct State {
        var reason: CancelReason?
        var canceller: (@Sendable () -> Void)?
    }

    private let state = Mutex(State())

    init() {}

    /// Installs the task's self-cancel closure; returns true (and installs
    /// nothing) if cancellation was already requested.
    func install(_ canceller: @escaping @Sendable () -> Void) -> Bool {
        state.withLock { s in
            if s.reason != nil { return true }
            s.canceller = canceller
            return false
        }
    }

    /// Removes the closure; after this returns no one calls it again.
    func uninstall() {
        state.withLock { $0.canceller = nil }
    }

    /// Requests cancellation (the first reason wins) and cancels the task if it runs.
    func cancel(_ reason: CancelReason) {
        state.withLock { s in
            guard s.reason == nil else { return }
            s.reason = reason
            // Called under the lock: the task cannot finish (uninstall) meanwhile.
            s.canceller?()
        }
    }

    /// The reason cancellation was requested, if it was.
    var reason: CancelReason? { state.withLock { $0.reason } }
}
