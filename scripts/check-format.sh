#!/usr/bin/env bash
# Fails when a Swift file is not formatted as `.swift-format` says (the swift-nio configuration:
# 4 spaces, 120 columns), naming each place. The generated protobuf code is left as protoc-gen-swift
# writes it. To format the tree: scripts/check-format.sh --fix
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

files() { git ls-files '*.swift' | grep -v '^Sources/ClusterWire/Generated/'; }

if [ "${1:-}" = "--fix" ]; then
    files | xargs swift format format --in-place --parallel
    exit 0
fi
files | xargs swift format lint --strict --parallel
