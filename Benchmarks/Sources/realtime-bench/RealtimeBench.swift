// issue 7: realtime fan-out load client. Opens N WebSockets to a realtime-sync-protocol
// server (ours or a peer), subscribes each, inserts rows at a steady rate into a table, and
// prints latency (receive time minus the change's commit_time; also minus the client_ts the
// inserter wrote), delivered changes/s, losses (every inserted id must reach every socket) and
// the server's RSS per idle subscribed socket. One RESULT line at the end for scripts.
//
//   realtime-bench --url ws://127.0.0.1:8080/ws --database-url postgres://... --sockets 1000 --rate 1000 --duration 10
// See `realtime-bench --help` and Benchmarks/scripts/realtime-bench.sh.
import Foundation
import NIOCore
import NIOPosix
import PoolKit
#if canImport(Glibc)
import Glibc
import Synchronization
#endif

@main
struct RealtimeBench {
    static func main() async {
        do {
            let options = try Options.parse(Array(CommandLine.arguments.dropFirst()))
            try await run(options)
        } catch let error as UsageError {
            FileHandle.standardError.write(Data("realtime-bench: \(error)\n\n\(Options.usage)\n".utf8))
            exit(2)
        } catch {
            FileHandle.standardError.write(Data("realtime-bench: \(error)\n".utf8))
            exit(1)
        }
    }

    static func run(_ options: Options) async throws {
        let (host, port, target) = try options.endpoint()
        let fdLimit = raiseOpenFileLimit()
        if fdLimit < options.sockets + 64 {
            print("warning: only \(fdLimit) file descriptors allowed for \(options.sockets) sockets; raise the hard limit (ulimit -Hn / LimitNOFILE / limits.conf nofile) and run again")
        }
        let expectedRows = Int(options.rate * options.duration) + 1
        print("realtime-bench \(options.label): \(options.sockets) sockets × \(options.subscriptions) subscription(s)\(options.uniqueIDs ? " (ids unique per socket)" : "") to \(options.table)"
              + (options.filter.map { " filter \($0)" } ?? "") + ", \(Int(options.rate)) rows/s for \(options.duration) s (batch ≤ \(options.batchLimit)), "
              + "\(options.threads) event-loop threads, auth \(options.token == nil ? "off" : "on"), open files ≤ \(fdLimit)")
        print("load average: \(loadAverage())")

        var request = "GET \(target) HTTP/1.1\r\nHost: \(host):\(port)\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        if let token = options.token, !options.tokenInQuery { request += "Authorization: Bearer \(token)\r\n" }
        request += "\r\n"
        let requestBuffer = ByteBuffer(string: request)
        @Sendable func subscribeFrames(socket: Int?) -> [ByteBuffer] {
            (1...options.subscriptions).map { k -> ByteBuffer in
                let id = socket.map { "s\(k)-\($0)" } ?? "s\(k)"
                var message = #"{"type":"subscribe","id":"\#(id)","table":"\#(options.table)""#
                if let filter = options.filter { message += #","filter":"\#(filter)""# }
                message += "}"
                return Frames.masked(opcode: 0x1, payload: Array(message.utf8))
            }
        }
        let sharedSubscribeFrames = subscribeFrames(socket: nil)
        let socketNumbers = Atomic<Int>(0)

        let group = MultiThreadedEventLoopGroup(numberOfThreads: options.threads)
        let loops = Array(group.makeIterator())
        var statsByLoop: [ObjectIdentifier: LoopStats] = [:]
        for loop in loops { statsByLoop[ObjectIdentifier(loop)] = LoopStats() }
        let stats = statsByLoop
        let counters = GlobalCounters()

        let rssBefore = options.serverPID.flatMap(readRSS)
        let connectStart = ContinuousClock.now
        let bootstrap = ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(30))
            .channelInitializer { channel in
                let frames = options.uniqueIDs
                    ? subscribeFrames(socket: socketNumbers.add(1, ordering: .relaxed).newValue) : sharedSubscribeFrames
                let handler = BenchSocket(request: requestBuffer, subscribeFrames: frames, expectedRows: expectedRows,
                                          stats: stats[ObjectIdentifier(channel.eventLoop)]!, counters: counters)
                return channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(handler) }
            }
        var channels: [any Channel] = []
        channels.reserveCapacity(options.sockets)
        var opened = 0
        while opened < options.sockets {
            let wave = min(options.connectConcurrency, options.sockets - opened)
            let futures = (0..<wave).map { _ in bootstrap.connect(host: host, port: port) }
            for future in futures {
                do {
                    channels.append(try await future.get())
                } catch {
                    throw BenchError(connectFailure(error, opened: channels.count, wanted: options.sockets, fdLimit: fdLimit))
                }
            }
            opened += wave
            // Keep the number of unanswered upgrades bounded too.
            while channels.count - counters.subscribedSockets.load(ordering: .relaxed) - counters.failedSockets.load(ordering: .relaxed) > options.connectConcurrency * 2 {
                try await Task.sleep(for: .milliseconds(5))
            }
        }
        let subscribeDeadline = ContinuousClock.now + .seconds(60)
        while counters.subscribedSockets.load(ordering: .relaxed) + counters.failedSockets.load(ordering: .relaxed) < options.sockets,
              ContinuousClock.now < subscribeDeadline {
            try await Task.sleep(for: .milliseconds(20))
        }
        let subscribed = counters.subscribedSockets.load(ordering: .relaxed)
        let connectTime = ContinuousClock.now - connectStart
        print("connect: \(subscribed)/\(options.sockets) subscribed in \(seconds(connectTime)) s, \(counters.failedSockets.load(ordering: .relaxed)) failed")
        if let error = counters.firstError.withLock({ $0 }) { print("first failure: \(error)") }
        guard subscribed == options.sockets else {
            try? await group.shutdownGracefully()
            throw BenchError("only \(subscribed) of \(options.sockets) sockets subscribed within 60 s")
        }

        var rssPerSocket: Double?
        if let pid = options.serverPID, let before = rssBefore {
            try await Task.sleep(for: .milliseconds(Int(options.idle * 1000)))
            if let after = readRSS(pid) {
                rssPerSocket = Double(after - before) / Double(options.sockets)
                print("server RSS (pid \(pid)): \(before) KB before, \(after) KB with \(options.sockets) idle subscribed sockets: \(String(format: "%.1f", rssPerSocket!)) KB per socket")
            }
        }

        var inserted = 0
        var insertSeconds = 0.0
        var insertStartWall: Int64 = 0
        if options.rate > 0, let url = options.databaseURL {
            let sql = try await PostgresConnection.connect(to: url)
            let statement = "INSERT INTO \(options.table) (id, client_ts, payload) SELECT g, $1::int8, 'x' FROM generate_series($2::int8, $3::int8) g"
            insertStartWall = wallMicros()
            let start = ContinuousClock.now
            let total = Int(options.rate * options.duration)
            while inserted < total {
                let elapsed = seconds(ContinuousClock.now - start)
                let due = min(total, Int(options.rate * elapsed) + 1)
                if due > inserted {
                    let count = min(due - inserted, options.batchLimit)
                    _ = try await sql.query(statement, Int(wallMicros()), inserted + 1, inserted + count)
                    inserted += count
                } else {
                    let wait = (Double(inserted) / options.rate) - elapsed
                    try await Task.sleep(for: .microseconds(max(50, Int(wait * 1_000_000))))
                }
            }
            insertSeconds = seconds(ContinuousClock.now - start)
            await sql.close()
            print("inserted \(inserted) rows in \(String(format: "%.2f", insertSeconds)) s (\(Int(Double(inserted) / insertSeconds))/s)")

            // Wait for stragglers: every socket should see every row.
            let expected = inserted * options.sockets
            let drainDeadline = ContinuousClock.now + .milliseconds(Int(options.drain * 1000))
            var lastCount = -1
            var stalledSince = ContinuousClock.now
            while ContinuousClock.now < drainDeadline {
                let count = counters.changes.load(ordering: .relaxed)
                if count >= expected { break }
                if count != lastCount { lastCount = count; stalledSince = ContinuousClock.now }
                // Nothing new for 3 s after the last insert and every socket is gone or done: stop waiting.
                if ContinuousClock.now - stalledSince > .seconds(3) { break }
                try await Task.sleep(for: .milliseconds(20))
            }
        }

        // Collect from every loop.
        struct Summary: Sendable {
            var commit: [UInt32], client: [UInt32], changes: Int, duplicates: Int, unparsable: Int, errors: Int
            var negative: Int, lastReceive: Int64, closeCodes: [UInt16: Int], missing: Int, incompleteSockets: Int
        }
        let rows = inserted
        var summaries: [Summary] = []
        for loop in loops {
            let s = stats[ObjectIdentifier(loop)]!
            summaries.append(try await loop.submit {
                var missing = 0, incomplete = 0
                for socket in s.sockets {
                    let m = socket.missing(upTo: rows)
                    missing += m
                    if m > 0 { incomplete += 1 }
                }
                return Summary(commit: s.commitLatency, client: s.clientLatency, changes: s.changes, duplicates: s.duplicates,
                               unparsable: s.unparsable, errors: s.errors, negative: s.negativeCommitLatency,
                               lastReceive: s.lastReceive, closeCodes: s.closeCodes, missing: missing, incompleteSockets: incomplete)
            }.get())
        }
        let closed = counters.closedSockets.load(ordering: .relaxed)
        let goingAway = Frames.masked(opcode: 0x8, payload: [0x03, 0xE8])  // 1000
        for channel in channels {
            channel.writeAndFlush(goingAway).whenComplete { _ in channel.close(promise: nil) }
        }
        try? await Task.sleep(for: .milliseconds(200))
        try? await group.shutdownGracefully()

        let changes = summaries.map(\.changes).reduce(0, +)
        let missing = summaries.map(\.missing).reduce(0, +)
        let incomplete = summaries.map(\.incompleteSockets).reduce(0, +)
        let duplicates = summaries.map(\.duplicates).reduce(0, +)
        let unparsable = summaries.map(\.unparsable).reduce(0, +)
        let negative = summaries.map(\.negative).reduce(0, +)
        let lastReceive = summaries.map(\.lastReceive).max() ?? 0
        var closeCodes: [UInt16: Int] = [:]
        for s in summaries { closeCodes.merge(s.closeCodes, uniquingKeysWith: +) }
        let commit = Histogram.percentiles(summaries.map(\.commit), [0.5, 0.95, 0.99])
        let client = Histogram.percentiles(summaries.map(\.client), [0.5, 0.95, 0.99])
        let window = inserted > 0 ? max(Double(lastReceive - insertStartWall) / 1e6, insertSeconds) : 0
        let delivered = window > 0 ? Double(changes) / window : 0

        func ms(_ micros: Double) -> String { micros.isNaN ? "-" : String(format: "%.2f", micros / 1000) }
        if inserted > 0 {
            print("delivered \(changes) changes in \(String(format: "%.2f", window)) s: \(Int(delivered))/s (offered \(Int(options.rate) * options.sockets)/s)")
            print("latency commit_time → receive, ms: p50 \(ms(commit.values[0])) p95 \(ms(commit.values[1])) p99 \(ms(commit.values[2])) max \(ms(commit.max))"
                  + (negative > 0 ? " (\(negative) negative, clamped to 0)" : ""))
            print("latency insert sent (client_ts) → receive, ms: p50 \(ms(client.values[0])) p95 \(ms(client.values[1])) p99 \(ms(client.values[2])) max \(ms(client.max))")
            print("losses: \(missing) of \(inserted * options.sockets) (row, socket) pairs missing on \(incomplete) sockets; duplicates \(duplicates); unparsable \(unparsable)")
        }
        print("sockets closed during the run: \(closed)" + (closeCodes.isEmpty ? "" : " close codes \(closeCodes.sorted { $0.key < $1.key }.map { "\($0.key)×\($0.value)" }.joined(separator: " "))"))
        print("load average: \(loadAverage())")
        print("RESULT label=\(options.label) sockets=\(options.sockets) rate=\(Int(options.rate)) p50_ms=\(ms(commit.values[0])) p95_ms=\(ms(commit.values[1])) "
              + "p99_ms=\(ms(commit.values[2])) client_p50_ms=\(ms(client.values[0])) client_p99_ms=\(ms(client.values[2])) delivered_per_s=\(Int(delivered)) "
              + "losses=\(missing) closed=\(closed) rss_kb_per_socket=\(rssPerSocket.map { String(format: "%.1f", $0) } ?? "-") "
              + "connect_s=\(seconds(connectTime)) load=\(loadAverage().split(separator: " ").first ?? "-")")
    }

    /// Raises the soft RLIMIT_NOFILE to the hard limit; returns the limit now in force.
    static func raiseOpenFileLimit() -> Int {
        var limit = rlimit()
        guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 1024 }
        if limit.rlim_cur < limit.rlim_max {
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            if setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &raised) == 0 { limit = raised }
        }
        return Int(clamping: limit.rlim_cur)
    }

    static func connectFailure(_ error: any Error, opened: Int, wanted: Int, fdLimit: Int) -> String {
        let text = "\(error)"
        // NIO wraps the socket() failure in a NIOConnectionError: match the errno text as well.
        let errno = (error as? IOError)?.errnoCode
        if errno == EMFILE || errno == ENFILE || text.contains("Too many open files") || text.contains("errno: 24") || text.contains("errno: 23") {
            return "connect failed after \(opened) of \(wanted) sockets: out of file descriptors (limit \(fdLimit)). "
                + "Raise the hard limit before starting, e.g. `ulimit -n \(max(wanted * 2 + 1024, 65536))` in the shell (root), "
                + "LimitNOFILE= for a systemd unit, or nofile in /etc/security/limits.conf; ENFILE means the system-wide fs.file-max."
        }
        if text.contains("Cannot assign requested address") || (error as? IOError)?.errnoCode == EADDRNOTAVAIL {
            return "connect failed after \(opened) of \(wanted) sockets: out of local ports; widen net.ipv4.ip_local_port_range (sysctl)."
        }
        return "connect failed after \(opened) of \(wanted) sockets: \(error)"
    }

    /// VmRSS of a process in KB.
    static func readRSS(_ pid: Int32) -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return Int(line.split(separator: " ", omittingEmptySubsequences: true)[1])
        }
        return nil
    }

    static func loadAverage() -> String {
        ((try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8)) ?? "").split(separator: " ").prefix(3).joined(separator: " ")
    }

    static func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }
}

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
