import Synchronization

/// Why a run's task was cancelled.
enum CancelReason: UInt8, Sendable {
    case jobCancelled
    case timeout
    case shutdownPolicy
    case shutdownDeadline
    case schedulerCancelled
}

/// Cancels one run from outside it.
///
/// A run's body executes inline on a worker task, and a task group cannot
/// cancel one of its children anyway. So the worker, before it calls the
/// body, installs its own task here (a `WorkerTask`: its `UnsafeCurrentTask`,
/// captured once per worker, stored unretained), and removes it again once
/// the body has returned; cancelling the run cancels the worker's task. Install,
/// cancel and removal happen under this lock, so the task is only ever
/// cancelled while the worker is inside *this* run: that is the lifetime rule
/// `UnsafeCurrentTask` asks callers to keep, and it is why a cancellation
/// aimed at one run never reaches the next run the same worker picks up (a
/// worker whose task was cancelled starts no further run; it exits).
///
/// Not final: `SchedulerState.RunStart` (the run's hand-over record) is a
/// `RunControl`, so a run costs one allocation, not two. All members are
/// final (no dynamic dispatch); `@unchecked` only because Swift accepts
/// `Sendable` on final classes alone: the only stored state is the mutex.
class RunControl: @unchecked Sendable {
    private struct State {
        var reason: CancelReason?
        // Used only under the lock, only between install and uninstall (see
        // above); unretained: the worker holds its `WorkerTask` while it runs.
        var worker: Unmanaged<WorkerTask>?
    }

    private final let state = Mutex(State())

    init() {}

    /// Installs the running worker's task; returns true (and installs
    /// nothing) if cancellation was already requested.
    final func install(_ worker: WorkerTask) -> Bool {
        // Lifetime and use as described above: only under the lock, only until uninstall.
        let w = Unmanaged.passUnretained(worker)
        return state.withLock { s in
            if s.reason != nil { return true }
            s.worker = w
            return false
        }
    }

    /// Removes the task; after this returns no one cancels it through this run.
    final func uninstall() {
        state.withLock { $0.worker = nil }
    }

    /// Requests cancellation (the first reason wins) and cancels the task if it runs.
    final func cancel(_ reason: CancelReason) {
        state.withLock { s in
            guard s.reason == nil else { return }
            s.reason = reason
            // Under the lock: the worker cannot leave the run (uninstall) meanwhile.
            s.worker?.takeUnretainedValue().task.cancel()
        }
    }

    /// The reason cancellation was requested, if it was.
    final var reason: CancelReason? { state.withLock { $0.reason } }
}

/// A worker's own task, captured once when the worker starts (not once per
/// run: that cost a `withUnsafeCurrentTask` and a retain/release of the task
/// per run). Used only by the worker itself and, through `RunControl`, while
/// the worker is inside a run; the worker keeps this object alive until it
/// returns, so the task outlives every use.
final class WorkerTask: @unchecked Sendable {
    // Lifetime: see above (the same rule RunControl keeps).
    let task: UnsafeCurrentTask

    init(_ task: UnsafeCurrentTask) { self.task = task }

    /// True once the worker's task is cancelled.
    var isCancelled: Bool { task.isCancelled }
}
