#!/usr/bin/env bash
# Fails when the committed generated code (Swift in Sources/ClusterWire/Generated/, Python in
# python/tessera/v1/) differs from what scripts/generate-protos.sh produces from Protos/ (changed,
# deleted or new untracked files).
# Needs what generate-protos.sh needs (protoc on PATH). Run it from a clean checkout, as CI does:
# it overwrites the generated folders in the work tree.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

generated=(Sources/ClusterWire/Generated python/tessera/v1)

bash scripts/generate-protos.sh

status=0
if ! git diff --exit-code --stat -- "${generated[@]}"; then
    echo "error: the generated code in ${generated[*]} is out of date:" >&2
    git diff -- "${generated[@]}" | head -n 200 >&2
    status=1
fi

untracked="$(git ls-files --others --exclude-standard -- "${generated[@]}")"
if [[ -n "$untracked" ]]; then
    echo "error: generated files that are not committed:" >&2
    echo "$untracked" >&2
    status=1
fi

if [[ $status -ne 0 ]]; then
    echo "run scripts/generate-protos.sh and commit ${generated[*]}" >&2
    exit 1
fi
echo "generated protobuf code is up to date" >&2
