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

/// The numeric core runs on x86-64 machines with AVX2/FMA/F16C (Haswell and later); without them
/// `SIMD16.addProduct` becomes a library call and Float16 conversion is ~20x slower.
let numericSettings: [SwiftSetting] =
    strictSettings + [.unsafeFlags(["-Xcc", "-march=haswell", "-target-cpu", "haswell"], .when(platforms: [.linux]))]

let package = Package(
    name: "Tessera",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "tessera", targets: ["tessera"]),
        .library(name: "KVCacheCore", targets: ["KVCacheCore"]),
        .library(name: "Workloads", targets: ["Workloads"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.3"),
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
        .package(url: "https://github.com/swiftlang/swift-subprocess.git", from: "1.0.2"),
        .package(url: "https://github.com/apple/swift-system.git", from: "1.8.1"),
    ],
    targets: [
        .target(name: "KVCacheCore", swiftSettings: numericSettings),
        .target(name: "Workloads", dependencies: ["KVCacheCore"], swiftSettings: numericSettings),
        .target(name: "Evaluation", dependencies: ["KVCacheCore", "Workloads"], swiftSettings: numericSettings),
        .target(
            name: "ClusterWire",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "tessera",
            dependencies: [
                "KVCacheCore",
                "Workloads",
                "Evaluation",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: numericSettings
        ),
        .testTarget(name: "KVCacheCoreTests", dependencies: ["KVCacheCore"], swiftSettings: strictSettings),
        .testTarget(name: "EvaluationTests", dependencies: ["Evaluation"], swiftSettings: strictSettings),
        .testTarget(
            name: "TesseraCLITests",
            dependencies: [
                "tessera",
                .product(name: "Subprocess", package: "swift-subprocess"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(name: "WorkloadsTests", dependencies: ["Workloads", "KVCacheCore"], swiftSettings: strictSettings),
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
    ]
)
