#!/usr/bin/env bash
# Builds and runs a package that depends on Tessera's KVCacheCore and Workloads libraries by version,
# as anyone else's package would, from a clone of this repository's HEAD tagged in a scratch folder.
# Swift 6.2 stopped refusing dependencies whose targets carry unsafe flags, so the build alone would
# not catch them; the manifest is checked for them first (they would also tie the code to one CPU).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

if grep -n "unsafeFlags" "$root/Package.swift"; then
    echo "error: Package.swift uses unsafeFlags; the libraries must build without them" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$root" "$work/tessera"
git -C "$work/tessera" tag 0.0.1

mkdir -p "$work/consumer/Sources/Consumer"
cat > "$work/consumer/Package.swift" <<MANIFEST
// swift-tools-version: 6.2
import PackageDescription

let package = Package(
    name: "Consumer",
    dependencies: [.package(url: "file://$work/tessera", exact: "0.0.1")],
    targets: [
        .executableTarget(
            name: "Consumer",
            dependencies: [
                .product(name: "KVCacheCore", package: "tessera"),
                .product(name: "Workloads", package: "tessera"),
            ]
        )
    ]
)
MANIFEST
cat > "$work/consumer/Sources/Consumer/main.swift" <<'SOURCE'
import KVCacheCore
import Workloads

let geometry = ModelGeometry.tiny
let trace = TraceGenerator(preset: .imageQA, geometry: geometry, seed: 1).sequence(0)
let prefill = trace.prefill(layer: 0)
print("kernels: \(Kernels.computePath); layer 0 of a \(prefill.promptLength)-token prompt synthesized")
SOURCE
(cd "$work/consumer" && swift build && swift run Consumer)
