// swift-tools-version: 6.2
import PackageDescription

/// Settings every Tessera target shares: Swift 6 mode comes from the tools version; these make
/// imports explicit and existentials visible, as the Swift server ecosystem does.
let strictSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
    .enableUpcomingFeature("InternalImportsByDefault"),
    .treatAllWarnings(as: .error),
]

let package = Package(
    name: "Tessera",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "tessera", targets: ["tessera"]),
        .library(name: "KVCacheCore", targets: ["KVCacheCore"]),
        .library(name: "Workloads", targets: ["Workloads"]),
        .library(name: "WireFuzzing", targets: ["WireFuzzing"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.3"),
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
        .package(url: "https://github.com/swiftlang/swift-subprocess.git", from: "1.0.2"),
        .package(url: "https://github.com/apple/swift-system.git", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.1"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
        .package(url: "https://github.com/apple/swift-asn1.git", from: "1.7.4"),
        .package(url: "https://github.com/apple/swift-distributed-tracing.git", from: "1.7.3"),
        // The OTLP/HTTP exporter only: the gRPC one would add grpc-swift to every build.
        .package(url: "https://github.com/swift-otel/swift-otel.git", from: "1.6.0", traits: ["OTLPHTTP"]),
    ],
    targets: [
        .target(name: "KVKernels"),
        .target(name: "KVCacheCore", dependencies: ["KVKernels"], swiftSettings: strictSettings),
        .target(
            name: "Workloads",
            dependencies: ["KVKernels", "KVCacheCore", .product(name: "Yams", package: "Yams")],
            swiftSettings: strictSettings
        ),
        .target(name: "Evaluation", dependencies: ["KVCacheCore", "Workloads"], swiftSettings: strictSettings),
        .target(
            name: "ClusterWire",
            dependencies: [
                "KVCacheCore", "Workloads",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            swiftSettings: strictSettings
        ),
        .target(
            name: "WireFuzzing",
            dependencies: [
                "ClusterWire", "KVCacheCore", "Workloads",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            swiftSettings: strictSettings
        ),
        .target(name: "ClusterState", swiftSettings: strictSettings),
        .target(
            name: "ClusterSecurity",
            dependencies: [
                "ClusterWire",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
            ],
            swiftSettings: strictSettings
        ),
        .target(
            name: "ClusterAdmin",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Yams", package: "Yams"),
            ],
            swiftSettings: strictSettings
        ),
        .target(
            name: "ClusterTransport",
            dependencies: [
                "ClusterWire", "ClusterAdmin", "ClusterSecurity",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: strictSettings
        ),
        .target(
            name: "Worker",
            dependencies: [
                "KVCacheCore", "Workloads", "ClusterWire", "ClusterTransport", "ClusterAdmin", "ClusterSecurity",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strictSettings
        ),
        .target(
            name: "Coordinator",
            dependencies: [
                "KVCacheCore", "ClusterWire", "ClusterTransport", "ClusterState", "ClusterAdmin", "ClusterSecurity",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strictSettings
        ),
        .target(
            name: "Client",
            dependencies: [
                "KVCacheCore", "Workloads", "ClusterWire", "ClusterTransport", "ClusterSecurity",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSettings
        ),
        .target(
            name: "Simulation",
            dependencies: [
                "KVCacheCore", "Workloads", "Evaluation", "ClusterWire", "ClusterTransport", "ClusterSecurity",
                "Coordinator", "Worker", "Client",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            swiftSettings: strictSettings
        ),
        .target(
            name: "ClusterLauncher",
            dependencies: [
                "ClusterTransport", "ClusterSecurity", "ClusterAdmin", "Client", "Workloads",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Subprocess", package: "swift-subprocess"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strictSettings
        ),
        .target(
            name: "LoadGenerator",
            dependencies: [
                "KVCacheCore", "Workloads", "Client", "ClusterTransport", "ClusterWire", "ClusterSecurity",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: strictSettings
        ),
        .target(
            name: "Chaos",
            dependencies: [
                "KVCacheCore", "Workloads", "Evaluation", "Client", "ClusterAdmin", "ClusterLauncher",
                "ClusterTransport",
                "ClusterSecurity",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Yams", package: "Yams"),
            ],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "tessera",
            dependencies: [
                "KVCacheCore",
                "Workloads",
                "Evaluation",
                "Simulation",
                "ClusterAdmin",
                "Coordinator",
                "Worker",
                "Client",
                "ClusterLauncher",
                "ClusterTransport",
                "ClusterWire",
                "ClusterSecurity",
                "LoadGenerator",
                "Chaos",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "Subprocess", package: "swift-subprocess"),
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "OTel", package: "swift-otel"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "KVCacheCoreTests",
            dependencies: ["KVCacheCore", "KVKernels"],
            swiftSettings: strictSettings
        ),
        .testTarget(name: "EvaluationTests", dependencies: ["Evaluation"], swiftSettings: strictSettings),
        .testTarget(
            name: "TesseraCLITests",
            dependencies: [
                "tessera", "ClusterLauncher",
                .product(name: "Subprocess", package: "swift-subprocess"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(name: "ClusterStateTests", dependencies: ["ClusterState"], swiftSettings: strictSettings),
        .testTarget(
            name: "SimulationTests",
            dependencies: ["Simulation", "ClusterTransport"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "ClusterSecurityTests",
            dependencies: ["ClusterSecurity", "ClusterWire"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "ClusterAdminTests",
            dependencies: [
                "ClusterAdmin",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Metrics", package: "swift-metrics"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "ClusterTests",
            dependencies: [
                "tessera", "Coordinator", "Worker", "Client", "ClusterTransport", "ClusterWire", "ClusterSecurity",
                "ClusterState",
                "KVCacheCore",
                "Workloads", "ClusterAdmin", "ClusterLauncher", "LoadGenerator", "Chaos", "Evaluation",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Subprocess", package: "swift-subprocess"),
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
                .product(name: "InMemoryTracing", package: "swift-distributed-tracing"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "LoadGeneratorTests",
            dependencies: ["LoadGenerator", "Workloads", "KVCacheCore"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "WorkloadsTests",
            dependencies: ["Workloads", "KVCacheCore", "KVKernels"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "ClusterWireTests",
            dependencies: [
                "ClusterWire",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "WireFuzzingTests",
            dependencies: [
                "WireFuzzing", "ClusterWire",
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: strictSettings
        ),
    ]
)
