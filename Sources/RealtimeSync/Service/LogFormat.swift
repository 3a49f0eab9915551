import Foundation
import Logging
import UnixSignals

/// Standard output or error, written so that a failed write loses only its own line.
/// (`FileHandle.write(_:)` traps on any error: a closed pipe, a closed terminal on SIGHUP or a
/// full disk crashed the process at its next log line, skipping the ordered shutdown.)
public struct StandardStream: Sendable {
    /// The file descriptor written.
    public let fileDescriptor: Int32
    /// Standard output.
    public static let output = StandardStream(fileDescriptor: 1)
    /// Standard error.
    public static let error = StandardStream(fileDescriptor: 2)
    /// One record at a time, so that concurrent lines (beyond a pipe's atomic size) do not interleave.
    private static let lock = NSLock()

    /// Writes `data` whole, or as much as the stream takes before it fails (then the rest is dropped).
    public func write(_ data: Data) {
        Self.lock.lock()
        defer { Self.lock.unlock() }
        data.withUnsafeBytes { (buffer: UnsafeRawBufferPointer) in
            guard var next = buffer.baseAddress else { return }
            var left = buffer.count
            while left > 0 {
                let written = Foundation.write(fileDescriptor, next, left)
                if written < 0 && errno == EINTR { continue }
                guard written > 0 else { return }
                next += written
                left -= written
            }
        }
    }

    /// Writes `text` as UTF-8.
    public func write(_ text: String) { write(Data(text.utf8)) }
}

/// How the program writes its log lines (`--log-format`).
public enum LogFormat: String, Sendable, CaseIterable {
    /// One JSON object per line: `ts`, `level`, `label`, `message`, then the metadata.
    case json
    /// swift-log's text lines (`StreamLogHandler`).
    case text

    /// A log handler writing to standard error in this format at `level`.
    public func makeHandler(label: String, level: Logger.Level) -> any LogHandler {
        switch self {
        case .json:
            var handler = JSONLogHandler(label: label)
            handler.logLevel = level
            return handler
        case .text:
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
    }
}

/// Writes each record as one line of JSON to standard error.
public struct JSONLogHandler: LogHandler {
    /// The logger's label.
    public let label: String
    /// Metadata attached to every record.
    public var metadata: Logger.Metadata = [:]
    /// Records below this level are dropped.
    public var logLevel: Logger.Level = .info

    /// Creates a handler for `label`.
    public init(label: String) { self.label = label }

    /// Metadata access.
    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    /// Writes one record.
    public func log(event: LogEvent) {
        var object: [String: Any] = [
            "ts": ISO8601DateFormatter.string(from: Date(), timeZone: TimeZone(identifier: "UTC")!,
                                              formatOptions: [.withInternetDateTime, .withFractionalSeconds]),
            "level": event.level.rawValue, "label": label, "message": "\(event.message)",
        ]
        var merged = metadata
        if let extra = event.metadata { merged.merge(extra) { _, new in new } }
        for (key, value) in merged where object[key] == nil { object[key] = Self.plain(value) }
        guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return }
        StandardStream.error.write(data + Data("\n".utf8))
    }

    private static func plain(_ value: Logger.MetadataValue) -> Any {
        switch value {
        case .string(let string): return string
        case .stringConvertible(let convertible): return "\(convertible)"
        case .array(let array): return array.map(plain)
        case .dictionary(let dictionary): return dictionary.mapValues(plain)
        }
    }
}

import Metrics
import Prometheus
import ServiceLifecycle

extension RealtimeService {
    /// Bootstraps the process-wide logging (`logFormat` json|text, `logLevel`) and metrics (a
    /// Prometheus factory on the returned registry: pass it as `server.metricsRegistry` so
    /// `/metrics` exports everything). Call once, before creating loggers and the service.
    public static func bootstrapObservability(logFormat: String, logLevel: String) throws(RealtimeServiceError) -> PrometheusCollectorRegistry {
        guard let level = Logger.Level(rawValue: logLevel) else {
            throw RealtimeServiceError(.invalidSetting, "--log-level / REALTIME_SYNC_LOG_LEVEL: '\(logLevel)' is not one of trace, debug, info, notice, warning, error, critical")
        }
        guard let format = LogFormat(rawValue: logFormat) else {
            throw RealtimeServiceError(.invalidSetting, "--log-format / REALTIME_SYNC_LOG_FORMAT: '\(logFormat)' is not json or text")
        }
        let registry = PrometheusCollectorRegistry()
        LoggingSystem.bootstrap { label in format.makeHandler(label: label, level: level) }
        MetricsSystem.bootstrap(makeMetricsFactory(registry: registry))
        return registry
    }

    /// Timer buckets from 10 µs to 10 s: what the pool's waits and uses, the scheduler's
    /// lateness (bar: p99 within 0.5 ms) and the server's latencies span. swift-prometheus's
    /// default starts at 5 ms, which put every sample of those in its first bucket, so a
    /// quantile computed from it read about 5 ms whatever the truth.
    public static let durationBuckets: [Duration] = [
        .microseconds(10), .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500),
        .milliseconds(1), .microseconds(2_500), .milliseconds(5), .milliseconds(10), .milliseconds(25),
        .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500),
        .seconds(1), .milliseconds(2_500), .seconds(5), .seconds(10),
    ]

    /// The Prometheus metrics factory `bootstrapObservability` installs, on `registry`, with
    /// `durationBuckets` for every timer.
    public static func makeMetricsFactory(registry: PrometheusCollectorRegistry) -> PrometheusMetricsFactory {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = durationBuckets
        return factory
    }

    /// Runs the service in a `ServiceGroup` until SIGINT, SIGTERM or SIGHUP (a closed terminal), then shuts it down in
    /// order (the documented root of the program). A second such signal while it shuts down cancels the
    /// shutdown's remaining steps instead of waiting for them (press Ctrl-C again to force); the run then
    /// throws `RealtimeServiceError` `shutdownForced`, so that the process exits non-zero. `onRunning` is
    /// called once it listens.
    public func runUntilSignalled(onRunning: @escaping @Sendable (Running) -> Void = { _ in }) async throws {
        let signals: [UnixSignal] = [.sigterm, .sigint, .sighup]
        let logger = configuration.logger
        // The group traps no signal itself: one watcher, trapping before the group runs, starts
        // the graceful shutdown at the first signal and forces it at the second. (With the group
        // trapping too, a signal in the moments before the group's own trap existed was counted
        // here only: the service went on serving, and the next signal counted as the second.)
        let group = ServiceGroup(configuration: .init(
            services: [.init(service: self)], gracefulShutdownSignals: [], logger: logger))
        let trapped = await UnixSignalsSequence(trapping: signals)
        let forced = OneShot()
        // Unstructured, so that the signal watcher can cancel it.
        let run = Task { try await group.run() }
        try await withTaskCancellationHandler {
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                tasks.addTask {
                    if let running = try? await self.waitUntilRunning() { onRunning(running) }
                }
                tasks.addTask {
                    var seen = 0
                    for await signal in trapped {
                        seen += 1
                        if seen == 1 {
                            logger.info("\(signal): shutting down in order (send it again to force)")
                            await group.triggerGracefulShutdown()
                        } else if self.orderedShutdownDone {
                            // Nothing left to force: what runs is the clean-up after the steps
                            // (the components ending, an embedded cluster's stop), bounded.
                            logger.notice("\(signal) again: the ordered shutdown is already done; finishing its clean-up")
                        } else if !forced.isSignalled {
                            logger.warning("second \(signal) while shutting down: cancelling the remaining shutdown steps")
                            forced.signal()
                            run.cancel()
                        }
                    }
                }
                let outcome = await run.result
                tasks.cancelAll()
                if case .failure(let error) = outcome, !(error is CancellationError) { throw error }
                if forced.isSignalled {
                    throw RealtimeServiceError(.shutdownForced, "a second signal cut the shutdown short: the steps still running were cancelled (sockets dropped without their close handshake, the pool cut off); a single SIGTERM shuts down in order within --shutdown-deadline")
                }
                try outcome.get()
            }
        } onCancel: {
            run.cancel()
        }
    }
}
