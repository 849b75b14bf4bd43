// swift-tools-version: 6.2
import PackageDescription

// The libFuzzer target over Tessera's wire layer (scripts/fuzz.sh builds and runs it). A package of
// its own so that only this executable is built with `-sanitize=fuzzer`: it has no `main` of its
// own, libFuzzer's calls `LLVMFuzzerTestOneInput`.
let package = Package(
    name: "TesseraFuzz",
    platforms: [.macOS(.v15)],
    dependencies: [.package(name: "Tessera", path: "..")],
    targets: [
        .executableTarget(
            name: "tessera-fuzz",
            dependencies: [.product(name: "WireFuzzing", package: "Tessera")],
            swiftSettings: [.enableExperimentalFeature("Extern"), .treatAllWarnings(as: .error)]
        )
    ]
)
