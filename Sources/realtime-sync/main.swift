import ArgumentParser
import Foundation
import PoolKit
import RealtimeSync

/// The `realtime-sync` command: argument parsing and wiring only; the work lives in the library.
@main
struct RealtimeSyncCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "realtime-sync",
        abstract: "Stream PostgreSQL row changes to WebSocket clients.",
        version: RealtimeSyncVersion.current,
        subcommands: [Check.self]
    )
}

/// `realtime-sync check`: can we reach the database, and is it set up for logical replication?
struct Check: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Connect to the database and print its version and wal_level.")

    @Option(name: .long, help: "postgres:// URL or libpq key=value string (default: $DATABASE_URL).")
    var databaseURL: String?

    @Option(name: .long, help: "Seconds to wait for the connection.")
    var connectTimeout: Int = 10

    func run() async throws {
        guard let url = databaseURL ?? ProcessInfo.processInfo.environment["DATABASE_URL"], !url.isEmpty else {
            throw ValidationError("no database given: pass --database-url or set DATABASE_URL")
        }
        do {
            let report = try await DatabaseCheck.run(url: url, connectTimeout: .seconds(connectTimeout))
            print(report.description)
            if !report.isReadyForLogicalReplication {
                throw ExitCode(2)
            }
        } catch let error as PostgresError {
            FileHandle.standardError.write(Data("realtime-sync check: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}
