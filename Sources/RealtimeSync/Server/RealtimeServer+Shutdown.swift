import Logging
import Synchronization

extension RealtimeServer {
    private enum StepOutcome: Sendable {
        case finished(String?)
        case failed(String)
        case timedOut
    }

    /// DESIGN.md's order: stop admitting; the hooks (jobs; capture and pool); deliver every
    /// change up to the cursor at which shutdown began; flush and close every socket with
    /// 1001; stop the listener. One log line per step, with its duration and what it cut off.
    func shutDownInOrder(stopFanout: AsyncStream<Void>.Continuation, listener: HTTPListener) async {
        let clock = ContinuousClock()
        let began = clock.now
        let stepCount = configuration.shutdownHooks.count + 4
        var stepNumber = 0
        func log(_ name: String, since start: ContinuousClock.Instant, cutOff: String?, _ extra: Logger.Metadata = [:]) {
            stepNumber += 1
            var metadata = extra
            metadata["step"] = "\(stepNumber)/\(stepCount)"
            metadata["duration_ms"] = "\(Self.milliseconds(start.duration(to: clock.now)))"
            metadata["cut_off"] = "\(cutOff ?? "nothing")"
            logger.info("shutdown: \(name)", metadata: metadata)
        }

        // 1. Stop admitting: /readyz and new upgrades answer 503.
        var start = clock.now
        let sessionCount = state.withLock { state in
            state.phase = max(state.phase, .draining)
            return state.sessions.count
        }
        log("stopped admitting (/readyz and /ws answer 503)", since: start, cutOff: nil, ["sessions": "\(sessionCount)"])

        // 2. The composition root's hooks: scheduler jobs, then capture and pool.
        for hook in configuration.shutdownHooks {
            start = clock.now
            let outcome = await Self.run(within: hook.deadline, hook.run)
            switch outcome {
            case .finished(let cutOff):
                log(hook.name, since: start, cutOff: cutOff)
            case .failed(let error):
                log(hook.name, since: start, cutOff: "failed: \(error)")
            case .timedOut:
                log(hook.name, since: start, cutOff: "deadline \(hook.deadline) exceeded (ShutdownHook.deadline; RealtimeService sets it from --shutdown-deadline); cancelled")
            }
        }

        // 3. Deliver every change up to where the source stands now (capture has stopped, if a hook stopped it).
        start = clock.now
        let target = source.currentCursor
        let drainDeadline = start.advanced(by: configuration.fanoutDrainDeadline)
        var reached = false
        while true {
            let (position, ended) = state.withLock { ($0.lastDelivered, $0.fanoutEnded) }
            if position >= target { reached = true; break }
            // Cancelled (a second signal): go on at once (a cancelled sleep returns at once, and
            // this loop spun until its deadline).
            if ended || clock.now >= drainDeadline || Task.isCancelled { break }
            try? await Task.sleep(for: .milliseconds(5))
        }
        stopFanout.yield()
        let position = state.withLock { $0.lastDelivered }
        log("fan-out delivered changes through the shutdown cursor", since: start,
            cutOff: reached ? nil : "changes after \(position) up to \(target) not delivered (fanoutDrainDeadline=\(configuration.fanoutDrainDeadline); RealtimeService sets it from --shutdown-deadline)",
            ["cursor": "\(target)"])

        // 4. Flush each socket's queue, close it with 1001, wait for the client's close frame.
        start = clock.now
        let sessions = state.withLock { state in
            state.phase = max(state.phase, .closingSockets)
            return Array(state.sessions.values)
        }
        for session in sessions { session.close(.goingAway) }
        let closeDeadline = start.advanced(by: configuration.socketCloseDeadline)
        var remaining = sessions.count
        while remaining > 0 && clock.now < closeDeadline && !Task.isCancelled {
            try? await Task.sleep(for: .milliseconds(5))
            remaining = state.withLock { $0.sessions.count }
        }
        var cut: String?
        if remaining > 0 {
            let stragglers = state.withLock { Array($0.sessions.values) }
            for session in stragglers {
                session.closeNow(.goingAway)
                session.channel.close(promise: nil)
            }
            cut = Task.isCancelled
                ? "\(stragglers.count) sockets dropped: the shutdown was cancelled (a second signal)"
                : "\(stragglers.count) sockets dropped without a finished close handshake (socketCloseDeadline=\(configuration.socketCloseDeadline); RealtimeService sets it from --shutdown-deadline)"
            let dropDeadline = clock.now.advanced(by: .seconds(1))
            while state.withLock({ !$0.sessions.isEmpty }) && clock.now < dropDeadline && !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(5))
            }
            let ending = state.withLock { $0.sessions.count }
            if ending > 0 && !Task.isCancelled {
                cut! += "; \(ending) sessions still ending 1 s after their sockets were dropped (a catch-up or snapshot that did not stop when cancelled)"
            }
        }
        log("closed sockets with 1001", since: start, cutOff: cut, ["sockets": "\(sessions.count)"])

        // 5. Stop the listener.
        start = clock.now
        let stopped = await Self.run(within: configuration.listenerStopDeadline) {
            await listener.stop()
            return nil
        }
        if case .timedOut = stopped {
            log("stopped the HTTP listener", since: start, cutOff: "listenerStopDeadline=\(configuration.listenerStopDeadline) exceeded (RealtimeService sets it from --shutdown-deadline); cancelled")
        } else {
            log("stopped the HTTP listener", since: start, cutOff: nil)
        }
        // Before the line that says so: a signal that comes after it has nothing to force.
        if !Task.isCancelled { shutdownCompleted.store(true, ordering: .releasing) }
        logger.info("shutdown complete", metadata: ["duration_ms": "\(Self.milliseconds(began.duration(to: clock.now)))"])
    }

    /// Runs `body` for at most `deadline`; it is cancelled after that, and the shutdown goes
    /// on without waiting for it (a step that ignores cancellation must not stall the rest:
    /// a task group would wait for it).
    private static func run(within deadline: Duration, _ body: @escaping @Sendable () async throws -> String?) async -> StepOutcome {
        let outcome = FirstOutcome()
        let step = Task {
            do {
                outcome.finish(.finished(try await body()))
            } catch {
                outcome.finish(.failed("\(error)"))
            }
        }
        let timer = Task {
            try? await Task.sleep(for: deadline)
            if !Task.isCancelled { outcome.finish(.timedOut) }
        }
        // The caller's cancellation (e.g. a service group that stops waiting) ends the step now.
        let result = await withTaskCancellationHandler {
            await outcome.value()
        } onCancel: {
            outcome.finish(.timedOut)
        }
        timer.cancel()
        if case .timedOut = result { step.cancel() }
        return result
    }

    /// The first of a step's end and its deadline.
    private final class FirstOutcome: Sendable {
        private let state = Mutex<(result: StepOutcome?, waiter: CheckedContinuation<StepOutcome, Never>?)>((nil, nil))

        func finish(_ result: StepOutcome) {
            let waiter = state.withLock { s -> CheckedContinuation<StepOutcome, Never>? in
                guard s.result == nil else { return nil }
                s.result = result
                defer { s.waiter = nil }
                return s.waiter
            }
            waiter?.resume(returning: result)
        }

        func value() async -> StepOutcome {
            await withCheckedContinuation { continuation in
                let ready = state.withLock { s -> StepOutcome? in
                    if let r = s.result { return r }
                    s.waiter = continuation
                    return nil
                }
                if let ready { continuation.resume(returning: ready) }
            }
        }
    }

    static func milliseconds(_ duration: Duration) -> Int64 {
        duration.components.seconds * 1_000 + duration.components.attoseconds / 1_000_000_000_000_000
    }
}
