// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "ferry",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "ferry", targets: ["ferry"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-certificates", from: "1.21.1"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-asn1", from: "1.7.4"),
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.10.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
    ],
    targets: [
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CXXHash", pkgConfig: "libxxhash", providers: [.apt(["libxxhash-dev"])]),
        .target(name: "CFerrySys"),

        // Pure logic: no I/O, no clocks, no randomness of its own.
        .target(name: "FerryCore"),
        // Frames, TLS peer links, identities.
        .target(name: "FerryWire", dependencies: [
            "FerryCore", "CXXHash", "CZstd",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "SwiftASN1", package: "swift-asn1"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Images and the catalog.
        .target(name: "FerryStore", dependencies: [
            "FerryCore", "CFerrySys", "CXXHash",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "GRDB", package: "GRDB.swift"),
        ]),
        // NBD server: serves any BlockDevice; knows nothing of replication.
        .target(name: "FerryNBD", dependencies: [
            "FerryCore",
            .product(name: "CoreMetrics", package: "swift-metrics"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The volume engine at run time: executes FerryCore's replication machines on images,
        // journals and links.
        .target(name: "FerryVolume", dependencies: [
            "FerryCore", "FerryStore", "FerryWire", "FerryNBD",
            .product(name: "CoreMetrics", package: "swift-metrics"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The daemon: config, services, admin API, status.
        .target(name: "FerrySite", dependencies: [
            "FerryCore", "FerryWire", "FerryStore", "FerryNBD", "FerryVolume", "FerryTree", "CFerrySys",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "Yams", package: "Yams"),
        ]),
        // Directory trees: chunking, (later) scanning, manifests, transfer, restore.
        .target(name: "FerryTree", dependencies: [
            "FerryCore", "FerryStore", "FerryWire", "CFerrySys",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "GRDB", package: "GRDB.swift"),
        ]),
        // Operating the daemon: Prometheus metrics and the status page on `listen.metrics`.
        .target(name: "FerryMonitor", dependencies: [
            "FerrySite", "FerryCore", "FerryWire",
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "CoreMetrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        ]),
        .executableTarget(name: "ferry", dependencies: [
            "FerrySite", "FerryMonitor", "FerryCore", "FerryWire", "CFerrySys",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        .testTarget(name: "FerryCoreTests", dependencies: ["FerryCore"]),
        // Seeded schedules of the replication state machines over a simulated network and disks.
        .testTarget(name: "FerrySimulationTests", dependencies: ["FerryCore"]),
        .testTarget(name: "FerryWireTests", dependencies: [
            "FerryWire", "FerryCore",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOEmbedded", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "SwiftASN1", package: "swift-asn1"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "FerryStoreTests", dependencies: [
            "FerryStore",
            .product(name: "NIOCore", package: "swift-nio"),
        ]),
        .testTarget(name: "FerryNBDTests", dependencies: [
            "FerryNBD",
            .product(name: "NIOEmbedded", package: "swift-nio"),
        ]),
        .testTarget(name: "FerrySiteTests", dependencies: ["FerrySite"]),
        .testTarget(name: "FerryTreeTests", dependencies: [
            "FerryTree", "FerryCore", "FerryStore", "FerryWire",
            .product(name: "NIOCore", package: "swift-nio"),
        ]),
        .testTarget(name: "FerryMonitorTests", dependencies: [
            "FerryMonitor", "FerrySite", "FerryCore", "FerryWire",
            .product(name: "Prometheus", package: "swift-prometheus"),
        ]),
        .testTarget(name: "IntegrationTests", dependencies: ["FerryCore", "FerrySite", "FerryStore", "FerryWire", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"), .product(name: "Logging", package: "swift-log")]),
    ],
    swiftLanguageModes: [.v6]
)
