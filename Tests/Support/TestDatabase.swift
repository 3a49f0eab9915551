import Foundation
import PoolKit

/// Shared by every test target (they run in one process), so that a test that needs the
/// database alone (fd counting, server restarts) can exclude all others.
///
/// The database the integration tests use: `REALTIME_SYNC_TEST_DATABASE_URL` when set, else one
/// `EmbeddedPostgres` per test process (started on first use, stopped at process exit).
public actor TestDatabase {
    /// The one instance per test process.
    public static let shared = TestDatabase()

    private var cluster: EmbeddedPostgres?
    private var url: String?
    private var starting: Task<EmbeddedPostgres, Error>?
    private var readers = 0
    private var writer = false
    private var waiting: [(exclusive: Bool, continuation: CheckedContinuation<Void, Never>)] = []

    /// The connection URL, starting the embedded cluster the first time.
    public func connectionURL() async throws -> String {
        if let url { return url }
        if let env = ProcessInfo.processInfo.environment["REALTIME_SYNC_TEST_DATABASE_URL"], !env.isEmpty {
            url = env
            return env
        }
        // One start for every concurrent caller (actor methods re-enter at each await).
        let task = starting ?? Task { try await EmbeddedPostgres.start() }
        starting = task
        let pg = try await task.value
        cluster = pg
        url = pg.url
        return pg.url
    }

    /// The embedded cluster, when the tests started one (nil with an external database).
    public func embedded() async throws -> EmbeddedPostgres? {
        _ = try await connectionURL()
        return cluster
    }

    /// Runs `body` while no exclusive test runs (most integration tests).
    public static func withDatabase<T: Sendable>(_ body: @Sendable (String) async throws -> T) async throws -> T {
        let url = try await shared.connectionURL()
        await shared.acquire(exclusive: false)
        do {
            let r = try await body(url)
            await shared.release(exclusive: false)
            return r
        } catch {
            await shared.release(exclusive: false)
            throw error
        }
    }

    /// Runs `body` while no exclusive test runs, without the shared database: for tests that
    /// start clusters or processes of their own, whose descriptors an fd-counting test
    /// (`withDatabaseAlone`) would otherwise count.
    public static func withoutExclusiveTests<T: Sendable>(_ body: @Sendable () async throws -> T) async throws -> T {
        await shared.acquire(exclusive: false)
        do {
            let r = try await body()
            await shared.release(exclusive: false)
            return r
        } catch {
            await shared.release(exclusive: false)
            throw error
        }
    }

    /// Runs `body` alone among the tests that use this lock (fd counting, server restarts).
    public static func withDatabaseAlone<T: Sendable>(_ body: @Sendable (String) async throws -> T) async throws -> T {
        let url = try await shared.connectionURL()
        await shared.acquire(exclusive: true)
        do {
            let r = try await body(url)
            await shared.release(exclusive: true)
            return r
        } catch {
            await shared.release(exclusive: true)
            throw error
        }
    }

    private func acquire(exclusive: Bool) async {
        if canEnter(exclusive: exclusive) && waiting.isEmpty {
            enter(exclusive: exclusive)
            return
        }
        await withCheckedContinuation { waiting.append((exclusive, $0)) }
    }

    private func canEnter(exclusive: Bool) -> Bool {
        exclusive ? (!writer && readers == 0) : !writer
    }

    private func enter(exclusive: Bool) {
        if exclusive { writer = true } else { readers += 1 }
    }

    private func release(exclusive: Bool) {
        if exclusive { writer = false } else { readers -= 1 }
        while let next = waiting.first, canEnter(exclusive: next.exclusive) {
            waiting.removeFirst()
            enter(exclusive: next.exclusive)
            next.continuation.resume()
        }
    }
}

/// Open file descriptors of this process.
public func openFileDescriptorCount() -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
}

/// A /proc file read to its end (its size shows as 0, which some readers take at its word).
func readProcFile(_ path: String) -> String? {
    guard let file = fopen(path, "r") else { return nil }
    defer { fclose(file) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65_536)
    while true {
        let n = fread(&buffer, 1, buffer.count, file)
        if n <= 0 { break }
        bytes.append(contentsOf: buffer[0..<n])
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// This process's open TCP sockets connected to `port` (from `/proc/self/fd` and
/// `/proc/net/tcp{,6}`): what a leaked database connection leaves behind, unaffected by the
/// files and sockets that tests running meanwhile open and close.
public func openSocketCount(toPort port: Int) -> Int {
    var inodes = Set<String>()
    for fd in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
        guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + fd),
              target.hasPrefix("socket:[") else { continue }
        inodes.insert(String(target.dropFirst(8).dropLast()))
    }
    let hexPort = String(format: "%04X", port)
    var count = 0
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        guard let text = readProcFile(table) else { continue }
        for line in text.split(separator: "\n").dropFirst() {
            let fields = line.split(separator: " ")
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            guard fields.count > 9, fields[2].hasSuffix(":" + hexPort), inodes.contains(String(fields[9])) else { continue }
            count += 1
        }
    }
    return count
}

/// Milliseconds since `start`.
public func elapsedMilliseconds(since start: ContinuousClock.Instant) -> Double {
    let d = ContinuousClock.now - start
    return Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
}
