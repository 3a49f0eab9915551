import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Why a run's task was cancelled.
enum CancelReason: UInt8, Sendable {
    case jobCancelled
    case timeout
    case shutdownPolicy
    case shutdownDeadline
    case schedulerCancelled
    /// Shutdown began before a worker started the run (a `.drain` job's run taken from the
    /// queue but not yet begun): it never starts.
    case shutdownBeforeStart
}

/// Cancels a run from outside it.
///
/// A run's body executes inline on a worker task, and a task group cannot
/// cancel one of its children anyway. So the worker, before it calls the
/// body, installs its own task here (a `WorkerTask`: its `UnsafeCurrentTask`,
/// captured once per worker, stored unretained), and removes it again once
/// the body has returned; cancelling the run cancels the worker's task. The
/// task is only ever cancelled while the worker is inside *this* run: a cancel
/// notes itself under this lock before it calls `cancel()` on the task (outside
/// the lock: that runs the body's cancellation handlers, which may cancel the
/// job again), and removal waits until no such call is in progress. That is
/// the lifetime rule `UnsafeCurrentTask` asks callers to keep, and it is why a
/// cancellation aimed at one run never reaches the next run the same worker
/// picks up (a worker whose task was cancelled starts no further run; it exits).
///
/// One control per *run slot* of the state machine, allocated when the slot
/// is first used and reused by every later run in that slot, so starting a
/// run allocates nothing. (An object per run cost a malloc on the thread
/// that popped the run and a free on the worker that ran it; across threads,
/// glibc's arena lock made the two sleep on each other during bursts.)
/// Every call therefore names the run by its serial: run serials only grow,
/// and a slot's runs are strictly sequential (a slot is reused only after its
/// run's end is recorded, which is after the worker removed its task), so a
/// request for an older serial than the slot has seen is stale and ignored.
final class RunControl: Sendable {
    private struct State {
        /// The run the cancellation below is for (0: none).
        var cancelledSerial: UInt64 = 0
        var reason: CancelReason?
        /// The run whose worker is installed (0: none).
        var installedSerial: UInt64 = 0
        /// The newest serial this slot has seen (older requests are stale).
        var latest: UInt64 = 0
        /// Calls to the installed task's `cancel()` in progress (made outside the lock).
        var cancelling = 0
        // Used only under the lock, only between install and uninstall (see
        // above); unretained: the worker holds its `WorkerTask` while it runs.
        var worker: Unmanaged<WorkerTask>?
    }

    private let state = Mutex(State())
    /// `State.cancelledSerial`, also readable without the lock (written only
    /// under it): asking whether a run was cancelled, which a worker does
    /// after every run, then costs a load instead of a lock round.
    private let cancelledMirror = Atomic<UInt64>(0)

    init() {}

    /// Installs the running worker's task for run `serial`; returns true (and
    /// installs nothing) if that run's cancellation was already requested.
    func install(_ worker: WorkerTask, serial: UInt64) -> Bool {
        // Lifetime and use as described above: only under the lock, only until uninstall.
        let w = Unmanaged.passUnretained(worker)
        return state.withLock { s in
            if s.cancelledSerial == serial { return true }
            s.latest = Swift.max(s.latest, serial)
            s.installedSerial = serial
            s.worker = w
            return false
        }
    }

    /// Removes the task; after this returns no one cancels it through this
    /// control. Returns why run `serial` was cancelled, if it was.
    func uninstall(serial: UInt64) -> CancelReason? {
        while true {
            let removed = state.withLock { s -> CancelReason?? in
                // A cancel is calling the task's `cancel()` on another thread: the task must
                // outlive that call, so the worker does not leave the run yet.
                guard s.cancelling == 0 else { return nil }
                s.installedSerial = 0
                s.worker = nil
                return .some(s.cancelledSerial == serial ? s.reason : nil)
            }
            if let removed { return removed }
            sched_yield()
        }
    }

    /// Keeps run `serial` from starting if its worker has not installed itself yet: `install`
    /// then reports it cancelled. A run already installed (started) is left alone. Ignored
    /// for a run older than the slot's newest.
    func preventStart(serial: UInt64) {
        state.withLock { s in
            guard serial >= s.latest, s.installedSerial != serial, s.cancelledSerial != serial else { return }
            s.latest = serial
            s.cancelledSerial = serial
            s.reason = .shutdownBeforeStart
            cancelledMirror.store(serial, ordering: .releasing)
        }
    }

    /// Requests cancellation of run `serial` (the first reason wins) and
    /// cancels its task if it runs. Ignored for a run older than the slot's newest.
    func cancel(serial: UInt64, _ reason: CancelReason) {
        let worker = state.withLock { s -> Unmanaged<WorkerTask>? in
            guard serial >= s.latest, s.cancelledSerial != serial else { return nil }
            s.latest = serial
            s.cancelledSerial = serial
            s.reason = reason
            cancelledMirror.store(serial, ordering: .releasing)
            guard s.installedSerial == serial, let worker = s.worker else { return nil }
            // Noted under the lock: the worker cannot leave the run (uninstall) until the
            // call below is done.
            s.cancelling += 1
            return worker
        }
        guard let worker else { return }
        // Outside the lock: `cancel()` runs the body's cancellation handlers here, and one
        // that cancels its own job comes back to this control (under the lock, that was a
        // recursive lock: a crash), or takes the scheduler's lock (a lock-order inversion).
        worker.takeUnretainedValue().task.cancel()
        state.withLock { $0.cancelling -= 1 }
    }

    /// The reason cancellation of run `serial` was requested, if it was.
    func reason(serial: UInt64) -> CancelReason? {
        // Not cancelled (the common case): no lock. A cancel racing with this
        // load is as if it came just after a read under the lock.
        guard cancelledMirror.load(ordering: .acquiring) == serial else { return nil }
        return state.withLock { $0.cancelledSerial == serial ? $0.reason : nil }
    }
}

/// One run to cancel: its slot's control and its serial.
struct RunCancel: Sendable {
    let control: RunControl
    let serial: UInt64

    /// Requests cancellation of this run (see `RunControl.cancel`).
    @inline(__always)
    func cancel(_ reason: CancelReason) { control.cancel(serial: serial, reason) }

    /// Keeps this run from starting (see `RunControl.preventStart`).
    func preventStart() { control.preventStart(serial: serial) }
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
