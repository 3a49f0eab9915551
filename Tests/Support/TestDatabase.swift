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

/// Milliseconds since `start`.
public func elapsedMilliseconds(since start: ContinuousClock.Instant) -> Double {
    let d = ContinuousClock.now - start
    return Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
}
