#!/usr/bin/env bash
# Regenerates the committed code for the wire contract:
#   Protos/tessera/v1/*.proto  ->  Sources/ClusterWire/Generated/tessera_v1_*.pb.swift
#                              ->  python/tessera/v1/*_pb2.py (the Python client's messages)
#
# Requires `protoc` on PATH (Debian: `apt-get install -y protobuf-compiler`, protoc 3.21.12); this
# script installs nothing. The plugin, protoc-gen-swift, is built from the swift-protobuf version
# that Package.resolved pins, so generator and runtime always match. Set PROTOC_GEN_SWIFT to the path
# of an already built plugin to skip that build.
#
# Generated types are `package`-visible: they may be used anywhere in this package but never leave
# it (see STYLE.md). Do not edit the generated files by hand; edit the .proto and run this script.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

proto_root="Protos"
output_dir="Sources/ClusterWire/Generated"
python_dir="python/tessera/v1"

if ! command -v protoc > /dev/null 2>&1; then
    echo "error: protoc not found on PATH; install it (Debian: apt-get install -y protobuf-compiler)" >&2
    exit 1
fi

if [[ -z "${PROTOC_GEN_SWIFT:-}" ]]; then
    echo "building protoc-gen-swift from the resolved swift-protobuf (release)..." >&2
    # With the test build's flags, so the SwiftProtobuf it already compiled is reused (not rebuilt
    # twice, once for each set of flags).
    swift build -c release -Xswiftc -enable-testing --product protoc-gen-swift >&2
    PROTOC_GEN_SWIFT="$(swift build -c release -Xswiftc -enable-testing --show-bin-path)/protoc-gen-swift"
fi
if [[ ! -x "$PROTOC_GEN_SWIFT" ]]; then
    echo "error: protoc-gen-swift not found or not executable at '$PROTOC_GEN_SWIFT'" >&2
    exit 1
fi

echo "using $(protoc --version) and protoc-gen-swift $("$PROTOC_GEN_SWIFT" --version)" >&2

mapfile -t protos < <(cd "$proto_root" && find . -name '*.proto' -type f | sed 's|^\./||' | LC_ALL=C sort)
if [[ ${#protos[@]} -eq 0 ]]; then
    echo "error: no .proto files under $proto_root" >&2
    exit 1
fi

# Generate into a scratch folder first, then replace the output folder's .pb.swift files, so that a
# deleted or renamed .proto also removes its stale generated file.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

protoc \
    --plugin="protoc-gen-swift=$PROTOC_GEN_SWIFT" \
    --proto_path="$proto_root" \
    --swift_out="$scratch" \
    --swift_opt=Visibility=Package \
    --swift_opt=FileNaming=PathToUnderscores \
    --swift_opt=UseAccessLevelOnImports=true \
    --python_out="$scratch" \
    --fatal_warnings \
    "${protos[@]}"

mkdir -p "$output_dir"
find "$output_dir" -maxdepth 1 -name '*.pb.swift' -type f -delete
cp "$scratch"/*.pb.swift "$output_dir"/
mkdir -p "$python_dir"
find "$python_dir" -maxdepth 1 -name '*_pb2.py' -type f -delete
cp "$scratch"/tessera/v1/*_pb2.py "$python_dir"/

echo "generated ${#protos[@]} file(s) into $output_dir and $python_dir:" >&2
ls -1 "$output_dir" "$python_dir" >&2
