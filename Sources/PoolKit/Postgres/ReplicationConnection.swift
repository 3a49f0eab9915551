import CLibPQ
#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization

/// What `IDENTIFY_SYSTEM` reports.
public struct ReplicationSystemIdentity: Sendable, Hashable {
    /// The cluster's unique system identifier (decimal text).
    public var systemID: String
    /// The current timeline.
    public var timeline: Int
    /// The current WAL flush position, as a raw 64-bit LSN.
    public var xlogPosition: UInt64
    /// The database this replication connection is bound to (`replication=database`).
    public var databaseName: String?

    /// Creates an identity (`identifySystem()` reads one from the server).
    public init(systemID: String, timeline: Int, xlogPosition: UInt64, databaseName: String?) {
        self.systemID = systemID
        self.timeline = timeline
        self.xlogPosition = xlogPosition
        self.databaseName = databaseName
    }
}

/// One `w` (XLogData) message of the replication stream.
public struct XLogData: Sendable {
    /// The WAL position of the start of this data (raw LSN).
    public var walStart: UInt64
    /// The server's current end of WAL (raw LSN).
    public var walEnd: UInt64
    /// When the server sent it: microseconds since 2000-01-01 00:00:00 UTC.
    public var sendTime: Int64
    /// The payload: for logical replication, one output-plugin message (e.g. one pgoutput message).
    public var payload: [UInt8]
}

/// One `k` (primary keepalive) message of the replication stream.
public struct PrimaryKeepalive: Sendable, Hashable {
    /// The server's current end of WAL (raw LSN).
    public var walEnd: UInt64
    /// When the server sent it: microseconds since 2000-01-01 00:00:00 UTC.
    public var sendTime: Int64
    /// Whether the server asked for an immediate status update (already sent by `readMessage()`).
    public var replyRequested: Bool
}

/// A message read from the replication stream.
public enum ReplicationMessage: Sendable {
    /// WAL data (one logical decoding output message).
    case xLogData(XLogData)
    /// A keepalive from the server.
    case keepalive(PrimaryKeepalive)
}

/// A logical replication connection (`replication=database`) through libpq, driven in
/// non-blocking mode like `PostgresConnection` (same reactor, same lock around the `PGconn`,
/// same close path).
///
/// Lifecycle: `connect` → `identifySystem()` / `createSlotIfMissing(_:plugin:)` (any order) →
/// `startReplication(slot:startLSN:options:)` (enters COPY BOTH) → `readMessage()` from one
/// task until it returns nil, while `runStatusSchedule()` runs in a sibling child task →
/// `stop()` (final status, CopyDone, drain, close) or `close()`.
///
/// Standby status updates (`r`) report `write`, `flush` and `apply` positions: `flush` and
/// `apply` are what the owner set with `confirm(flushedThrough:)` (the slot's confirmed
/// position never goes beyond it), `write` is the furthest position received. They are sent
/// every `statusInterval`, at once when a keepalive asks for a reply, and by `stop()`.
/// Times on the wire are microseconds since 2000-01-01.
public final class ReplicationConnection: Sendable {
    /// The underlying connection: owns the `PGconn` (freed once by its close path).
    let connection: PostgresConnection

    private struct StreamState: Sendable {
        enum Phase: Sendable { case idle, streaming, ended }
        var phase: Phase = .idle
        var received: UInt64 = 0
        var flushed: UInt64 = 0
        var statusInterval: Duration = .seconds(10)
        var lastStatus: ContinuousClock.Instant = .now
        var statusDue = false
        /// The next status update asks the server for a keepalive in return.
        var askReply = false
        var woken = false
        var statusUpdatesSent = 0
        var spin = SpinPolicy()
        var waits = 0
        /// `PQgetCopyData` returned -1: only the final results remain to be read.
        var copyEnding = false
        /// The first error result read while ending (kept across reads: a server's FATAL
        /// comes in one read, the closed socket in the next).
        var endingFailure: PostgresError?
        /// Our CopyDone went out (`stop()`): no status update may follow it (libpq would
        /// refuse it and the clean end of the stream would be lost).
        var copyDoneSent = false
        /// `stop()` read the stream to its end (the server's CopyDone) instead of giving up.
        var stoppedCleanly = false
    }

    private let stream = Mutex(StreamState())

    private init(connection: PostgresConnection, busyPoll: Duration) {
        self.connection = connection
        let (secs, atto) = busyPoll.components
        let budget = max(0, Int(secs) * 1_000_000_000 + Int(atto / 1_000_000_000))
        stream.withLock { $0.spin.maxBudget = budget }
    }

    /// Connects with `replication=database` added to the connection string's keywords.
    ///
    /// `configuration.busyPoll` also applies to the stream: when libpq has no complete message,
    /// `readMessage()` polls the socket for up to that long before parking on the reactor (a
    /// stream's data arrives in bursts, and parking costs two thread wake-ups); `SpinPolicy`
    /// pauses spinning after repeated misses, so an idle stream does not burn CPU.
    public static func connect(_ configuration: PostgresConnection.Configuration) async throws -> ReplicationConnection {
        let conn = try await PostgresConnection.connect(configuration, extraKeywords: [("replication", "database")])
        return ReplicationConnection(connection: conn, busyPoll: configuration.busyPoll)
    }

    /// How many times `readMessage()` parked on the reactor waiting for data (diagnostics).
    public var readerWaits: Int { stream.withLock { $0.waits } }

    /// The server's backend process ID for this walsender.
    public var backendPID: Int32 { connection.backendPID }
    /// The host this connection reached.
    public var host: String { connection.host }
    /// The port this connection reached.
    public var port: String { connection.port }
    /// True once closed or known dead.
    public var isClosed: Bool { connection.isClosed }
    /// How many standby status updates were sent (diagnostics and tests).
    public var statusUpdatesSent: Int { stream.withLock { $0.statusUpdatesSent } }
    /// The flush position last set with `confirm(flushedThrough:)`.
    public var confirmedFlush: UInt64 { stream.withLock { $0.flushed } }

    // MARK: Commands

    /// Runs `IDENTIFY_SYSTEM`.
    public func identifySystem() async throws -> ReplicationSystemIdentity {
        let results = try await connection.execute("IDENTIFY_SYSTEM")
        guard let result = results.last, result.count == 1 else {
            throw PostgresError(code: .invalidUsage, message: "IDENTIFY_SYSTEM returned no row (backend \(backendPID) at \(host):\(port))")
        }
        let row = result[0]
        let lsnText = try row.decode(String.self, at: 2) ?? ""
        guard let lsn = Self.parseLSN(lsnText) else {
            throw PostgresError(code: .decoding, message: "IDENTIFY_SYSTEM returned xlogpos '\(lsnText)', not an LSN")
        }
        return ReplicationSystemIdentity(
            systemID: try row.decode(String.self, at: 0) ?? "",
            timeline: try row.decode(Int.self, at: 1) ?? 0,
            xlogPosition: lsn,
            databaseName: try row.decode(String.self, at: 3))
    }

    /// Runs `TIMELINE_HISTORY timeline`: the timeline's history file, one line per ancestor
    /// (`parent timeline`, tab, the LSN where it was left, tab, a reason). Timeline 1 has none.
    public func timelineHistory(_ timeline: Int) async throws -> String {
        let results = try await connection.execute("TIMELINE_HISTORY \(timeline)")
        guard let result = results.last, result.count == 1 else {
            throw PostgresError(code: .invalidUsage, message: "TIMELINE_HISTORY \(timeline) returned no row (backend \(backendPID) at \(host):\(port))")
        }
        // The file's bytes as sent (the column is typed bytea on some versions, sent raw).
        return result[0][1].withUTF8 { String(decoding: $0, as: UTF8.self) }
    }

    /// The server's `wal_sender_timeout` (`SHOW wal_sender_timeout`); nil when it is 0
    /// (disabled) or its text cannot be read.
    public func walSenderTimeout() async throws -> Duration? {
        let results = try await connection.execute("SHOW wal_sender_timeout")
        guard let text = try results.last.flatMap({ $0.count == 1 ? try $0[0].decode(String.self, at: 0) : nil }) else { return nil }
        return Self.parseSettingDuration(text)
    }

    /// A time setting as `SHOW` prints it (`60s`, `150ms`, `1min`, `0`); nil for 0 or unknown.
    static func parseSettingDuration(_ text: String) -> Duration? {
        let digits = text.prefix { $0.isNumber }
        guard let value = Int64(digits), value > 0 else { return nil }
        switch text.dropFirst(digits.count).trimmingCharacters(in: .whitespaces) {
        case "us": return .microseconds(value)
        case "ms", "": return .milliseconds(value)
        case "s": return .seconds(value)
        case "min": return .seconds(value * 60)
        case "h": return .seconds(value * 3_600)
        case "d": return .seconds(value * 86_400)
        default: return nil
        }
    }

    /// Creates a persistent logical replication slot unless one with this name exists.
    /// Returns true when it was created. Slot names are `[a-z0-9_]`, at most 63 characters.
    @discardableResult
    public func createSlotIfMissing(_ name: String, plugin: String = "pgoutput") async throws -> Bool {
        try Self.validateSlotName(name)
        let sql = "CREATE_REPLICATION_SLOT \(try connection.escapeIdentifier(name)) LOGICAL \(try connection.escapeIdentifier(plugin)) NOEXPORT_SNAPSHOT"
        do {
            try await connection.execute(sql)
            return true
        } catch let error as PostgresError where error.sqlState == "42710" {
            return false  // duplicate_object: the slot exists
        }
    }

    /// Drops the replication slot `name` (`DROP_REPLICATION_SLOT`); the slot must not be active.
    public func dropSlot(_ name: String) async throws {
        try Self.validateSlotName(name)
        try await connection.execute("DROP_REPLICATION_SLOT \(try connection.escapeIdentifier(name))")
    }

    /// Starts logical replication from `slot` (`START_REPLICATION SLOT … LOGICAL …`) and enters
    /// COPY BOTH mode. `startLSN` 0 means "from the slot's confirmed position" (the server never
    /// goes back before it). `options` are the plugin's, e.g. `[("proto_version", "1"),
    /// ("publication_names", "\"pub\"")]`; values are sent as string literals.
    public func startReplication(slot: String, startLSN: UInt64 = 0, options: [(String, String)] = [],
                                 statusInterval: Duration = .seconds(10)) async throws {
        try Self.validateSlotName(slot)
        var sql = "START_REPLICATION SLOT \(try connection.escapeIdentifier(slot)) LOGICAL \(Self.formatLSN(startLSN))"
        if !options.isEmpty {
            let parts = try options.map { "\(try connection.escapeIdentifier($0.0)) \(try connection.escapeLiteral($0.1))" }
            sql += " (" + parts.joined(separator: ", ") + ")"
        }
        try await enterCopyBoth(sql)
        stream.withLock { s in
            s.phase = .streaming
            s.statusInterval = statusInterval
            s.lastStatus = .now
            s.received = max(s.received, startLSN)
            s.flushed = max(s.flushed, startLSN)
        }
    }

    /// Sets the position reported as flushed and applied: the server may discard WAL before it
    /// and will not resend transactions that committed before it. Never moves backwards.
    public func confirm(flushedThrough lsn: UInt64) {
        stream.withLock { $0.flushed = max($0.flushed, lsn) }
    }

    // MARK: Reading

    private enum ReadStep {
        case message(ReplicationMessage)
        case wait(ReactorSocket, SocketInterest)
        /// More results are to come; the error among those read so far, if any.
        case waitEnding(ReactorSocket, PostgresError?)
        case ended
    }

    /// Reads the next message (`PQgetCopyData` in async mode, waiting on the reactor when none
    /// is buffered). Returns nil when the stream ended (the server finished COPY or `stop()` ran)
    /// or when `wake()` was called. Sends a status update first when one is due, and at once
    /// after a keepalive that asks for a reply. Call from one task at a time.
    public func readMessage() async throws -> ReplicationMessage? {
        while true {
            let (statusDue, askReply, woken, phase) = stream.withLock { s -> (Bool, Bool, Bool, StreamState.Phase) in
                let due = s.phase == .streaming && !s.copyDoneSent && (s.statusDue || s.lastStatus.duration(to: .now) >= s.statusInterval)
                let ask = s.askReply
                s.statusDue = false
                s.askReply = false
                defer { s.woken = false }
                return (due, ask, s.woken, s.phase)
            }
            if phase == .ended { return nil }
            guard phase == .streaming else {
                throw PostgresError(code: .invalidUsage, message: "readMessage() before startReplication() on backend \(backendPID)")
            }
            if statusDue { try await sendStatus(replyRequested: askReply) }
            if woken { return nil }
            let (ending, endingFailure) = stream.withLock { ($0.copyEnding, $0.endingFailure) }
            switch try readStep(ending: ending, failure: endingFailure) {
            case .message(let message):
                switch message {
                case .xLogData(let data):
                    stream.withLock { $0.received = max($0.received, data.walStart) }
                case .keepalive(let keepalive):
                    stream.withLock { $0.received = max($0.received, keepalive.walEnd) }
                    // Not after our CopyDone: libpq would refuse it and the clean end be lost.
                    if keepalive.replyRequested && !stream.withLock({ $0.copyDoneSent }) { try await sendStatus(replyRequested: false) }
                }
                return message
            case .ended:
                stream.withLock { $0.phase = .ended }
                return nil
            case .waitEnding(let socket, let failure):
                stream.withLock {
                    $0.copyEnding = true
                    $0.endingFailure = $0.endingFailure ?? failure
                }
                switch await SocketReactor.shared.wait(socket, for: .readable) {
                case .ready, .interrupted: continue
                case .cancelled: throw CancellationError()
                }
            case .wait(let socket, let interest):
                let budget = stream.withLock { $0.spin.budgetNanoseconds() }
                if interest == .readable, budget > 0 {
                    let hit = spinUntilReadable(fd: socket.fd, budgetNanoseconds: budget)
                    stream.withLock { $0.spin.record(hit: hit) }
                    if hit { continue }
                }
                stream.withLock { $0.waits += 1 }
                switch await SocketReactor.shared.wait(socket, for: interest) {
                case .ready: continue
                case .interrupted:
                    // Nudged, or a `sendStatus` from another task waits on the socket (one
                    // waiter per socket): end its wait (it leaves the rest of its update to
                    // this reader) rather than retry against it at once.
                    SocketReactor.shared.interrupt(socket)
                    continue
                case .cancelled: throw CancellationError()
                }
            }
        }
    }

    /// One non-blocking attempt: a buffered message, the end of the stream, or what to wait for.
    private func readStep(ending: Bool, failure: PostgresError?) throws -> ReadStep {
        try connection.state.withLock { s -> ReadStep in
            guard let pg = s.pg else { throw connection.closedError() }
            if ending { return try finishCopyLocked(pg, &s, failure: failure) }
            var attempt = 0
            while true {
                var buffer: UnsafeMutablePointer<CChar>? = nil
                let n = PQgetCopyData(pg, &buffer, 1)
                if n > 0, let buffer {
                    defer { PQfreemem(buffer) }
                    return .message(try Self.parse(UnsafeRawBufferPointer(start: buffer, count: Int(n)), backend: connection.backendPID))
                }
                if n == 0 {
                    if attempt > 0 {
                        // Output a status update left behind (its sender found the socket full
                        // while this reader waited on it): flush it, and wait for the socket to
                        // take the rest as well as for input.
                        let f = PQflush(pg)
                        if f < 0 { s.broken = true; throw connection.brokenError(pg, context: "could not flush the replication connection") }
                        return .wait(s.socket, f == 1 ? .readableOrWritable : .readable)
                    }
                    attempt += 1
                    if PQconsumeInput(pg) == 0 {
                        s.broken = true
                        throw connection.brokenError(pg, context: "replication stream lost")
                    }
                    continue
                }
                if n == -2 {
                    s.broken = true
                    throw connection.brokenError(pg, context: "replication stream failed")
                }
                // -1: the server ended the COPY; collect the final result(s).
                return try finishCopyLocked(pg, &s, failure: failure)
            }
        }
    }

    /// After `PQgetCopyData` returned -1: reads results until libpq has no more, without blocking.
    /// `failure`: the error result an earlier call read, which wins over later ones.
    private func finishCopyLocked(_ pg: OpaquePointer, _ s: inout PostgresConnection.State, failure earlier: PostgresError?) throws -> ReadStep {
        // A failed read (the server closed the socket) still leaves what came before it in
        // libpq's buffer, typically the FATAL ErrorResponse that says why: the results below
        // are parsed from it, and a lost connection ends at the CONNECTION_BAD check.
        let readFailed = PQconsumeInput(pg) == 0
        if readFailed { s.broken = true }
        var failure = earlier
        while PQisBusy(pg) == 0 {
            guard let r = PQgetResult(pg) else {
                s.busy = false
                if let failure { throw failure }
                return .ended
            }
            defer { PQclear(r) }
            switch PQresultStatus(r) {
            case PGRES_COMMAND_OK, PGRES_TUPLES_OK, PGRES_EMPTY_QUERY:
                break
            case PGRES_COPY_IN:
                // The server finished its side; finish ours so the command can complete.
                _ = PQputCopyEnd(pg, nil)
                _ = PQflush(pg)
            case PGRES_COPY_BOTH, PGRES_COPY_OUT:
                break
            default:
                var e = serverError(r, pg)
                if e.severity == "FATAL" || e.severity == "PANIC" || PQstatus(pg) == CONNECTION_BAD {
                    e.code = .connectionBroken
                    s.broken = true
                }
                e.message += " (replication stream of backend \(connection.backendPID) at \(connection.host):\(connection.port))"
                if failure == nil { failure = e }
            }
        }
        if readFailed || PQstatus(pg) == CONNECTION_BAD {
            s.broken = true
            throw failure ?? connection.brokenError(pg, context: "replication stream lost while ending")
        }
        return .waitEnding(s.socket, failure)
    }

    /// Parses one CopyData message of the stream. A malformed one is a `decoding` error, not a
    /// broken connection: the server speaks another protocol, and reconnecting cannot cure it.
    static func parse(_ raw: UnsafeRawBufferPointer, backend: Int32) throws -> ReplicationMessage {
        func u64(_ offset: Int) -> UInt64 { UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
        switch raw.first {
        case UInt8(ascii: "w"):
            guard raw.count >= 25 else {
                throw PostgresError(code: .decoding, message: "XLogData message of \(raw.count) bytes is shorter than its 25-byte header (backend \(backend))")
            }
            return .xLogData(XLogData(walStart: u64(1), walEnd: u64(9), sendTime: Int64(bitPattern: u64(17)),
                                      payload: Array(UnsafeRawBufferPointer(rebasing: raw[25...]))))
        case UInt8(ascii: "k"):
            guard raw.count >= 18 else {
                throw PostgresError(code: .decoding, message: "keepalive message of \(raw.count) bytes is shorter than 18 bytes (backend \(backend))")
            }
            return .keepalive(PrimaryKeepalive(walEnd: u64(1), sendTime: Int64(bitPattern: u64(9)), replyRequested: raw[17] != 0))
        default:
            let tag = raw.first.map { String(UnicodeScalar($0)) } ?? "empty"
            throw PostgresError(code: .decoding, message: "unexpected replication message '\(tag)' (\(raw.count) bytes) from backend \(backend); expected 'w' or 'k'")
        }
    }

    // MARK: Status updates

    /// Sends a standby status update now (`r`: write, flush, apply, clock, reply flag) and
    /// flushes it, waiting for the socket to become writable if it is full. Safe beside a
    /// reader parked in `readMessage()` on another task: when the socket is full and that reader
    /// waits on it, the update stays queued in libpq and the reader flushes it (its waits then
    /// also wait for the socket to take it; one waiter per socket: before, the sender retried
    /// at once, spinning a core until the reader woke). Throws if the connection closes first.
    public func sendStatus(replyRequested: Bool = false) async throws {
        let (write, flush) = stream.withLock { s -> (UInt64, UInt64) in
            s.lastStatus = .now
            s.statusDue = false
            return (max(s.received, s.flushed), s.flushed)
        }
        var message = [UInt8](repeating: 0, count: 34)
        message[0] = UInt8(ascii: "r")
        Self.put(write, into: &message, at: 1)
        Self.put(flush, into: &message, at: 9)
        Self.put(flush, into: &message, at: 17)
        Self.put(UInt64(bitPattern: Self.nowSince2000()), into: &message, at: 25)
        message[33] = replyRequested ? 1 : 0
        try await putCopyData(message)
        stream.withLock { $0.statusUpdatesSent += 1 }
    }

    private func putCopyData(_ message: [UInt8]) async throws {
        var queued = false
        while true {
            let wait: ReactorSocket? = try connection.state.withLock { s -> ReactorSocket? in
                guard let pg = s.pg else { throw connection.closedError() }
                if !queued {
                    let rc = message.withUnsafeBufferPointer { buf in
                        buf.baseAddress!.withMemoryRebound(to: CChar.self, capacity: buf.count) {
                            PQputCopyData(pg, $0, Int32(buf.count))
                        }
                    }
                    if rc < 0 { s.broken = true; throw connection.brokenError(pg, context: "could not send standby status update") }
                    if rc == 0 { return s.socket }
                    queued = true
                }
                return try flushLocked(pg, &s)
            }
            guard let socket = wait else { return }
            switch await SocketReactor.shared.wait(socket, for: .writable) {
            case .ready: continue
            case .cancelled: throw CancellationError()
            case .interrupted:
                // Another waiter (the reader) holds the socket, or someone nudged it. Once the
                // update is in libpq's buffer, hand the rest to the reader: its wait re-arms
                // for writable while output is pending (`readStep`). Not yet buffered: retry
                // after a pause, not at once.
                // A close also ends the wait this way (`release`): then the update is lost.
                if connection.state.withLock({ $0.pg == nil }) { throw connection.closedError() }
                SocketReactor.shared.interrupt(socket)
                if queued { return }
                try await Task.sleep(for: .milliseconds(1))
            }
        }
    }

    /// `PQflush`; returns the fd to wait writable on when output remains.
    private func flushLocked(_ pg: OpaquePointer, _ s: inout PostgresConnection.State) throws -> ReactorSocket? {
        let f = PQflush(pg)
        if f < 0 { s.broken = true; throw connection.brokenError(pg, context: "could not flush the replication connection") }
        if f == 1 {
            // The server may be waiting for us to read: keep input moving while output is stuck.
            if PQconsumeInput(pg) == 0 { s.broken = true; throw connection.brokenError(pg, context: "replication stream lost") }
            return s.socket
        }
        return nil
    }

    /// Sends a status update every `statusInterval` (set by `startReplication`) until the
    /// stream ends, the connection closes or the calling task is cancelled. Run it in a child
    /// task beside the reader: it only marks the update due and wakes the reader, which sends it.
    public func runStatusSchedule() async {
        while true {
            let (interval, phase) = stream.withLock { ($0.statusInterval, $0.phase) }
            if phase == .ended || connection.isClosed { return }
            do { try await Task.sleep(for: interval.sleepable) } catch { return }
            stream.withLock { $0.statusDue = true }
            let socket = connection.state.withLock { $0.socket }
            SocketReactor.shared.interrupt(socket)
        }
    }

    /// Has the reader send a status update at once (from any task); with `replyRequested` the
    /// server answers with a keepalive carrying its current end of WAL. Returns once the reader
    /// took the request, the connection closed, `timeout` passed or the task is cancelled.
    public func requestStatus(replyRequested: Bool, timeout: Duration = .seconds(1)) async {
        stream.withLock { s in
            s.statusDue = true
            s.askReply = s.askReply || replyRequested
        }
        await nudge(timeout: timeout) { !$0.statusDue }
    }

    /// Makes the current or next `readMessage()` return nil (e.g. to stop). Safe from any task;
    /// retries the wake-up until the reader took it, the connection closed, `timeout` passed
    /// or the calling task is cancelled.
    public func wake(timeout: Duration = .seconds(1)) async {
        stream.withLock { $0.woken = true }
        await nudge(timeout: timeout) { !$0.woken }
    }

    /// Interrupts the reader's socket wait until `taken` holds. An interrupt that arrives just
    /// before the reader parks is lost, hence the retries.
    private func nudge(timeout: Duration, until taken: (StreamState) -> Bool) async {
        let socket = connection.state.withLock { $0.socket }
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            SocketReactor.shared.interrupt(socket)
            if stream.withLock({ taken($0) }) || connection.isClosed { return }
            do { try await Task.sleep(for: .milliseconds(1)) } catch { return }
        }
    }

    // MARK: Stopping

    /// Ends replication cleanly: a final status update, `PQputCopyEnd`, then reads (and drops)
    /// whatever the server still sends until the stream ends, and closes. Bounded by `timeout`;
    /// past it the connection is closed anyway. Never throws: a stop of a dead connection closes it.
    public func stop(timeout: Duration = .seconds(5)) async {
        let streaming = stream.withLock { $0.phase == .streaming }
        if streaming, !connection.isBroken {
            await withTaskGroup(of: Void.self) { group in
                group.addTask {
                    do {
                        try await self.sendStatus(replyRequested: false)
                        try await self.endCopy()
                        while try await self.readMessage() != nil {}
                        self.stream.withLock { $0.stoppedCleanly = true }
                    } catch {
                        self.connection.configuration.logger.debug("replication stop: \(error)")
                    }
                }
                group.addTask { try? await Task.sleep(for: timeout.sleepable) }
                await group.next()
                group.cancelAll()
            }
        }
        await close()
    }

    private func endCopy() async throws {
        var sent = false
        while true {
            let wait: ReactorSocket? = try connection.state.withLock { s -> ReactorSocket? in
                guard let pg = s.pg else { throw connection.closedError() }
                if !sent {
                    let rc = PQputCopyEnd(pg, nil)
                    if rc < 0 { s.broken = true; throw connection.brokenError(pg, context: "could not end COPY") }
                    if rc == 0 { return s.socket }
                    sent = true
                    stream.withLock { $0.copyDoneSent = true }
                }
                return try flushLocked(pg, &s)
            }
            guard let socket = wait else { return }
            if await SocketReactor.shared.wait(socket, for: .writable) == .cancelled { throw CancellationError() }
        }
    }

    /// Whether the last `stop()` read the stream to the server's end of COPY (for tests).
    var stoppedCleanly: Bool { stream.withLock { $0.stoppedCleanly } }

    /// Closes the connection and frees the `PGconn` exactly once. Idempotent.
    public func close() async {
        stream.withLock { $0.phase = .ended }
        connection.closeNow()
    }

    // MARK: COPY BOTH entry

    private func enterCopyBoth(_ sql: String) async throws {
        try Task.checkCancellation()
        try connection.state.withLock { s in
            guard let pg = s.pg else { throw connection.closedError() }
            guard !s.busy else {
                throw PostgresError(code: .invalidUsage, message: "replication connection \(connection.backendPID) is busy (already streaming?)")
            }
            if s.broken || PQstatus(pg) == CONNECTION_BAD { throw connection.brokenError(pg, context: "connection is broken") }
            s.busy = true
            if PQsendQuery(pg, sql) == 0 {
                s.busy = false
                if PQstatus(pg) == CONNECTION_BAD { s.broken = true }
                throw connection.brokenError(pg, context: "could not send START_REPLICATION")
            }
        }
        var flushed = false
        var failure: PostgresError?
        while true {
            enum Step { case inCopy, done, wait(ReactorSocket, SocketInterest) }
            let step: Step = try connection.state.withLock { s in
                guard let pg = s.pg else { throw connection.closedError() }
                if !flushed {
                    if let socket = try flushLocked(pg, &s) { return .wait(socket, .writable) }
                    flushed = true
                }
                if PQconsumeInput(pg) == 0 { s.broken = true; throw connection.brokenError(pg, context: "connection lost") }
                while PQisBusy(pg) == 0 {
                    guard let r = PQgetResult(pg) else { s.busy = false; return .done }
                    defer { PQclear(r) }
                    switch PQresultStatus(r) {
                    case PGRES_COPY_BOTH:
                        return .inCopy
                    case PGRES_COMMAND_OK, PGRES_TUPLES_OK:
                        break
                    default:
                        if failure == nil { failure = serverError(r, pg) }
                    }
                }
                return .wait(s.socket, .readable)
            }
            switch step {
            case .inCopy:
                return
            case .done:
                var e = failure ?? PostgresError(code: .invalidUsage, message: "START_REPLICATION did not enter COPY BOTH mode")
                if e.code == .server {
                    e.message += " (START_REPLICATION on \(connection.host):\(connection.port))"
                }
                throw e
            case .wait(let socket, let interest):
                if await SocketReactor.shared.wait(socket, for: interest) == .cancelled {
                    closeAfterCancel()
                    throw CancellationError()
                }
            }
        }
    }

    private func closeAfterCancel() { connection.closeNow() }

    // MARK: Helpers

    /// True if PostgreSQL accepts `name` as a replication slot's: 1-63 characters from
    /// a-z, 0-9 and _ (checked before anything is created, so that a bad name fails first).
    public static func isValidSlotName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 63 && name.utf8.allSatisfy {
            ($0 >= UInt8(ascii: "a") && $0 <= UInt8(ascii: "z")) || ($0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9")) || $0 == UInt8(ascii: "_")
        }
    }

    static func validateSlotName(_ name: String) throws {
        guard isValidSlotName(name) else {
            throw PostgresError(code: .invalidUsage, message: "replication slot name '\(name)' is invalid: use 1-63 characters from a-z, 0-9 and _")
        }
    }

    /// Parses `XXXXXXXX/XXXXXXXX`.
    static func parseLSN(_ text: String) -> UInt64? {
        let parts = text.split(separator: "/")
        guard parts.count == 2, let high = UInt32(parts[0], radix: 16), let low = UInt32(parts[1], radix: 16) else { return nil }
        return UInt64(high) << 32 | UInt64(low)
    }

    static func formatLSN(_ lsn: UInt64) -> String {
        String(lsn >> 32, radix: 16, uppercase: true) + "/" + String(lsn & 0xFFFF_FFFF, radix: 16, uppercase: true)
    }

    private static func put(_ value: UInt64, into buffer: inout [UInt8], at offset: Int) {
        for i in 0..<8 { buffer[offset + i] = UInt8(truncatingIfNeeded: value >> UInt64(56 - 8 * i)) }
    }

    /// Microseconds since 2000-01-01 00:00:00 UTC, now.
    static func nowSince2000() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return (Int64(ts.tv_sec) - 946_684_800) * 1_000_000 + Int64(ts.tv_nsec) / 1000
    }
}
