// Round trips per second of `SELECT $1::int` on one PostgresConnection (extended protocol),
// the same statement `pgbench -M extended -c 1` sends.
// Usage: pg-roundtrip URL [seconds] [busy-poll-microseconds] [global|reactor]
//   global (default): the loop runs on Swift's global executor, as most callers do;
//   reactor: the loop prefers PostgresConnection.preferredExecutor (the reactor thread).
import Foundation
import PoolKit

let args = CommandLine.arguments
guard args.count >= 2 else {
    FileHandle.standardError.write(Data("usage: pg-roundtrip URL [seconds]\n".utf8))
    exit(2)
}
let url = args[1]
let seconds = args.count >= 3 ? Double(args[2]) ?? 10 : 10
let busyPoll = args.count >= 4 ? Int(args[3]) ?? 50 : 50
let onReactor = args.count >= 5 && args[4] == "reactor"

// The loop runs in a detached task, not on the main actor, so each await does not hop threads.
try await Task.detached(executorPreference: onReactor ? PostgresConnection.preferredExecutor : nil) {
    let conn = try await PostgresConnection.connect(
        PostgresConnection.Configuration(url, busyPoll: .microseconds(busyPoll)))
    // Warm up: plan cache, TCP, allocator.
    for i in 0..<2000 { _ = try await conn.query("SELECT $1::int", i) }

    var count = 0
    var checksum = 0
    let clock = ContinuousClock()
    let start = clock.now
    let deadline = start + .milliseconds(Int(seconds * 1000))
    while clock.now < deadline {
        for _ in 0..<100 {
            let rows = try await conn.query("SELECT $1::int", count)
            checksum &+= try rows[0].decode(Int.self, at: 0) ?? 0
            count += 1
        }
    }
    let elapsed = clock.now - start
    let secs = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
    let expected = (count - 1) * count / 2
    precondition(checksum == expected, "wrong results: checksum \(checksum) != \(expected)")
    print(String(format: "pg-roundtrip (\(onReactor ? "reactor" : "global"), busyPoll \(busyPoll) µs): %d round trips in %.2f s = %.0f per second", count, secs, Double(count) / secs))
    await conn.close()
}.value
