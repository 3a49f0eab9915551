// issue 5: capture throughput. Commits N rows in transactions of B rows into a published
// table while two slots hold the WAL, then reads the same backlog with ChangeStream (decoded
// into ChangeEvents) and with PostgreSQL's pg_recvlogical (pgoutput, same publication), and
// prints both rates and the ratio.
//
//   capture-bench <url> [rows] [rowsPerTransaction] [ours-first|recv-first]
// pg_recvlogical is found under /usr/lib/postgresql/<newest>/bin unless PG_RECVLOGICAL is set.
import Foundation
import PoolKit
import RealtimeSync

@main
struct CaptureBench {
    static func main() async throws {
        let args = CommandLine.arguments
        guard args.count >= 2 else {
            print("usage: capture-bench <postgres-url> [rows=200000] [rowsPerTransaction=100] [ours-first|recv-first]")
            exit(2)
        }
        let url = args[1]
        let rows = args.count > 2 ? Int(args[2])! : 200_000
        let perTransaction = args.count > 3 ? Int(args[3])! : 100
        let recvFirst = args.count > 4 && args[4] == "recv-first"
        // ChangeStream.Configuration.busyPoll (default 50 µs), e.g. CAPTURE_BUSY_POLL_US=0 to compare.
        let busyPollMicros = Int(ProcessInfo.processInfo.environment["CAPTURE_BUSY_POLL_US"] ?? "") ?? 50
        print("busyPoll \(busyPollMicros) µs")
        let recvlogical = ProcessInfo.processInfo.environment["PG_RECVLOGICAL"] ?? findRecvlogical()
        let transactions = rows / perTransaction
        let ours = "capture_bench_ours"
        let theirs = "capture_bench_recv"
        let publication = "capture_bench_pub"

        let sql = try await PostgresConnection.connect(to: url)
        for slot in [ours, theirs] {
            try await sql.query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", slot)
        }
        try await sql.execute("""
            DROP PUBLICATION IF EXISTS \(publication); DROP TABLE IF EXISTS capture_bench;
            CREATE TABLE capture_bench (id int8 PRIMARY KEY, amount numeric, status text, payload jsonb,
                                        created_at timestamptz, flag bool);
            CREATE PUBLICATION \(publication) FOR TABLE capture_bench;
            """)
        for slot in [ours, theirs] {
            try await sql.query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot)
        }
        let insertStart = ContinuousClock.now
        try await sql.execute("""
            DO $$ BEGIN
              FOR t IN 0..\(transactions - 1) LOOP
                INSERT INTO capture_bench
                  SELECT t * \(perTransaction) + g, (g % 1000) + 0.25, CASE WHEN g % 2 = 0 THEN 'open' ELSE 'paid "now"' END,
                         jsonb_build_object('n', t * \(perTransaction) + g, 'tags', jsonb_build_array('a', 'b')),
                         '2026-11-26 18:00:00.123456+00', g % 3 = 0
                  FROM generate_series(1, \(perTransaction)) g;
                COMMIT;
              END LOOP;
            END $$
            """)
        let insertTime = ContinuousClock.now - insertStart
        let endLSN = try await sql.query("SELECT pg_current_wal_lsn()::text")[0].decode(String.self, at: 0)!
        print("committed \(rows) rows in \(transactions) transactions of \(perTransaction) in \(insertTime); end of WAL \(endLSN)")

        var ourRate = 0.0
        var ourTotalRate = 0.0
        var recvRate = 0.0
        func runOurs() async throws {
        // Ours: ChangeStream on the backlog, timed from the first change seen to the last.
        let stream = ChangeStream(.init(connectionString: url, slotName: ours, publicationName: publication,
                                        tables: ["capture_bench"], consumerBufferLimit: rows + 1,
                                        busyPoll: .microseconds(busyPollMicros)))
        let changes = stream.changes()
        let runStart = ContinuousClock.now
        // The consumer runs in a child task (not on the main actor, where every change would hop).
        let (first, last, count, jsonBytes) = try await withThrowingTaskGroup(
            of: (ContinuousClock.Instant, ContinuousClock.Instant, Int, Int)?.self
        ) { group in
            group.addTask { try await stream.run(); return nil }
            group.addTask {
                var first: ContinuousClock.Instant?
                var count = 0
                var jsonBytes = 0
                var buffer: [UInt8] = []
                buffer.reserveCapacity(1024)
                for try await event in changes {
                    if first == nil { first = .now }
                    count += 1
                    if count % 16 == 0 {
                        // Sample the JSON encoding so the events are proven usable without timing fan-out.
                        buffer.removeAll(keepingCapacity: true)
                        event.writeJSON(into: &buffer)
                        jsonBytes += buffer.count
                    }
                    if count == rows { break }
                }
                let last = ContinuousClock.now
                print("reader parked on the reactor \(stream.statistics.readerWaits) times")
                stream.stop()
                return (first!, last, count, jsonBytes)
            }
            var outcome: (ContinuousClock.Instant, ContinuousClock.Instant, Int, Int)?
            for try await result in group { if let result { outcome = result } }
            return outcome!
        }
        let ourTime = last - first
        ourRate = Double(count) / seconds(ourTime)
        let ourTotal = last - runStart
        ourTotalRate = Double(count) / seconds(ourTotal)
        print("ChangeStream: \(count) changes in \(ourTime) from first to last = \(Int(ourRate)) changes/s (\(Int(Double(count) / seconds(ourTotal))) changes/s including connect and setup, \(ourTotal)); sampled JSON \(jsonBytes) bytes")
        _ = try await stream.dropSlot()

        }
        func runTheirs() throws {
        // Theirs: pg_recvlogical on the same backlog until it reaches the end LSN.
        let process = Process()
        process.executableURL = URL(fileURLWithPath: recvlogical)
        process.arguments = ["-d", url, "--slot", theirs, "--start", "-E", endLSN, "--no-loop",
                             "-o", "proto_version=1", "-o", "publication_names=\(publication)", "-f", "/dev/null"]
        let recvStart = ContinuousClock.now
        try process.run()
        process.waitUntilExit()
        let recvTime = ContinuousClock.now - recvStart
        recvRate = Double(rows) / seconds(recvTime)
        print("pg_recvlogical: \(rows) changes in \(recvTime) (process start to exit at \(endLSN), exit \(process.terminationStatus)) = \(Int(recvRate)) changes/s")
        }
        if recvFirst {
            try runTheirs()
            try await runOurs()
        } else {
            try await runOurs()
            try runTheirs()
        }
        // Like for like: pg_recvlogical is timed from process start (connect, START_REPLICATION,
        // the walsender's start-up) to exit, so ours counts its connect and setup too.
        print(String(format: "ratio ChangeStream (including connect and setup) / pg_recvlogical: %.2fx   (first to last change only: %.2fx)   bar: >= 40,000 changes/s and >= 0.5x",
                     ourTotalRate / recvRate, ourRate / recvRate))

        try await sql.query("SELECT pg_drop_replication_slot($1)", theirs)
        try await sql.execute("DROP PUBLICATION \(publication); DROP TABLE capture_bench")
        await sql.close()
    }

    static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    static func findRecvlogical() -> String {
        let fm = FileManager.default
        let versions = ((try? fm.contentsOfDirectory(atPath: "/usr/lib/postgresql")) ?? []).sorted { (Int($0) ?? 0) > (Int($1) ?? 0) }
        for v in versions where fm.isExecutableFile(atPath: "/usr/lib/postgresql/\(v)/bin/pg_recvlogical") {
            return "/usr/lib/postgresql/\(v)/bin/pg_recvlogical"
        }
        return "pg_recvlogical"
    }
}
