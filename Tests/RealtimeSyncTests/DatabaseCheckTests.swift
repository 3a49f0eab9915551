import Testing
import PoolKit
import RealtimeSync
import TestSupport

@Suite("realtime-sync check")
struct DatabaseCheckTests {
    @Test("reports version and wal_level of a real server")
    func reportsServer() async throws {
        try await TestDatabase.withDatabase { url in
            let report = try await DatabaseCheck.run(url: url)
            #expect(report.walLevel == "logical")
            #expect(report.isReadyForLogicalReplication)
            #expect(report.serverVersion.first?.isNumber == true)
            #expect(report.description.contains("wal_level: logical"))
        }
    }

    @Test("a wal_level other than logical is reported with what to change")
    func notLogical() {
        let report = DatabaseCheck(serverVersion: "15.18", walLevel: "replica", host: "h", port: "5432")
        #expect(!report.isReadyForLogicalReplication)
        #expect(report.description.contains("wal_level=logical"))
    }

    @Test("an unreachable server is a connection error naming host and port")
    func unreachable() async throws {
        let port = try EmbeddedPostgres.freePort()
        do {
            _ = try await DatabaseCheck.run(url: "postgres://x@127.0.0.1:\(port)/db", connectTimeout: .seconds(3))
            Issue.record("expected a failure")
        } catch let error as PostgresError {
            #expect(error.isConnectionBroken)
            #expect(error.description.contains("127.0.0.1:\(port)"))
        }
    }
}
