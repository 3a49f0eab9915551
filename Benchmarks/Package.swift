// swift-tools-version: 6.2
// Benchmarks live in their own package so that peers used only for comparison
// (postgres-nio, async-algorithms) never enter the library's dependency graph.
import PackageDescription

let package = Package(
    name: "realtime-sync-benchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "swift-realtime-sync", path: ".."),
        .package(url: "https://github.com/vapor/postgres-nio.git", exact: "1.33.2"),
        .package(url: "https://github.com/apple/swift-async-algorithms.git", from: "1.0.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.0"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.81.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.5.0"),
    ],
    targets: [
        // issue 2: SELECT $1::int round trips on one PostgresConnection
        .executableTarget(
            name: "pg-roundtrip",
            dependencies: [.product(name: "PoolKit", package: "swift-realtime-sync")],
            path: "Sources/pg-roundtrip"
        ),
        // issue 3: pool lease/release and real-database throughput vs postgres-nio's PostgresClient
        .executableTarget(
            name: "pool-bench",
            dependencies: [
                .product(name: "PoolKit", package: "swift-realtime-sync"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
                // postgres-nio's pool itself, with its own mocks, for the no-I/O comparison
                .product(name: "_ConnectionPoolModule", package: "postgres-nio"),
                .product(name: "_ConnectionPoolTestUtils", package: "postgres-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ],
            path: "Sources/pool-bench"
        ),
        // issue 4: JobScheduler lateness, schedule/cancel cost, memory vs a naive Task-per-job baseline
        .executableTarget(
            name: "scheduler-bench",
            dependencies: [
                .product(name: "Scheduler", package: "swift-realtime-sync"),
                .product(name: "AsyncAlgorithms", package: "swift-async-algorithms"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Sources/scheduler-bench"
        ),
        // issue 5: capture throughput (ChangeStream) vs pg_recvlogical on the same backlog
        .executableTarget(
            name: "capture-bench",
            dependencies: [
                .product(name: "RealtimeSync", package: "swift-realtime-sync"),
                .product(name: "PoolKit", package: "swift-realtime-sync"),
            ],
            path: "Sources/capture-bench"
        ),
        // issue 7: WebSocket fan-out load client (latency from commit_time, delivered/s, losses, server RSS per socket)
        .executableTarget(
            name: "realtime-bench",
            dependencies: [
                .product(name: "PoolKit", package: "swift-realtime-sync"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            path: "Sources/realtime-bench"
        ),
    ],
    swiftLanguageModes: [.v6]
)
