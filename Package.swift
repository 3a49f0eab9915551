// swift-tools-version: 6.2
import PackageDescription

let package = Package(
    name: "swift-realtime-sync",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "PoolKit", targets: ["PoolKit"]),
        .library(name: "Scheduler", targets: ["Scheduler"]),
        .library(name: "RealtimeSync", targets: ["RealtimeSync"]),
        .executable(name: "realtime-sync", targets: ["realtime-sync"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.0"),
    ],
    targets: [
        .systemLibrary(
            name: "CLibPQ",
            pkgConfig: "libpq",
            providers: [.apt(["libpq-dev"]), .brew(["libpq"])]
        ),
        .target(
            name: "PoolKit",
            dependencies: [
                "CLibPQ",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .target(
            name: "Scheduler",
            dependencies: [
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .target(
            name: "RealtimeSync",
            dependencies: [
                "PoolKit",
                "Scheduler",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .executableTarget(
            name: "realtime-sync",
            dependencies: [
                "RealtimeSync",
                "PoolKit",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // Test-only helpers shared by the test targets (one database per test process).
        .target(name: "TestSupport", dependencies: ["PoolKit"], path: "Tests/Support"),
        .testTarget(name: "PoolKitTests", dependencies: ["PoolKit", "TestSupport"]),
        .testTarget(name: "SchedulerTests", dependencies: ["Scheduler"]),
        .testTarget(name: "RealtimeSyncTests", dependencies: ["RealtimeSync", "PoolKit", "TestSupport"]),
    ],
    swiftLanguageModes: [.v6]
)
