/// An error thrown by the scheduler. The message names the value, the limit
/// and the knob to change; `code` is stable and meant for programs.
public struct SchedulerError: Error, Sendable, Hashable, CustomStringConvertible {
    /// Stable error codes.
    public enum Code: String, Sendable, Hashable {
        /// A cron expression could not be parsed or never matches.
        case invalidCronExpression = "SCHED_INVALID_CRON"
        /// A trigger's interval, delay or other duration is out of range.
        case invalidTrigger = "SCHED_INVALID_TRIGGER"
        /// A job option (overlap, missed-run, retry, jitter, timeout) is out of range, or
        /// `ownMetrics` is set with an empty name.
        case invalidOption = "SCHED_INVALID_OPTION"
        /// `schedule` was called after the scheduler began shutting down.
        case shutDown = "SCHED_SHUT_DOWN"
        /// `run()` was called on a scheduler that is already running (on one that has
        /// finished, `run()` returns at once).
        case alreadyRunning = "SCHED_ALREADY_RUNNING"
        /// The scheduler ran out of job slots.
        case tooManyJobs = "SCHED_TOO_MANY_JOBS"
    }

    /// The stable code.
    public let code: Code
    /// A human readable message that says what to change.
    public let message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// `"<code>: <message>"`.
    public var description: String { "\(code.rawValue): \(message)" }
}
