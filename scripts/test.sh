#!/usr/bin/env bash
# The test suite, as README gives it and .ci/run runs it; needs only Swift 6.3 and Python 3.10+ with
# `venv`, and reaches PyPI once. It makes a Python environment under .build/python with the pinned
# packages of python/requirements-test.txt (for the Python client's tests, the interop test and
# tessera.dump_hf's test, which needs the CPU build of PyTorch: see that file),
# builds the package optimised with testing enabled (the build the chaos scenario and the simulation
# reuse), runs the Swift tests, then the Python client's tests against a cluster of that build.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.build/python
if [[ ! -x "$venv/bin/python3" ]]; then
    echo "--- a Python environment for the tests in $venv" >&2
    python3 -m venv "$venv"
fi
# The packages (PyTorch among them) download while Swift builds; the Swift tests need them (InteropTests).
# --no-compile: byte-compiling all of PyTorch took a minute of CPU from the build; Python compiles
# what the tests import when they import it.
"$venv/bin/python3" -m pip install -q --no-compile --disable-pip-version-check -r python/requirements-test.txt &
pip_install=$!
export TESSERA_PYTHON="$PWD/$venv/bin/python3"

swift build -c release --build-tests -Xswiftc -enable-testing
wait "$pip_install" || { echo "installing python/requirements-test.txt into $venv failed" >&2; exit 1; }
swift test -c release --skip-build
echo "--- the Python client against a local cluster" >&2
(cd python && TESSERA_BINARY="$PWD/../.build/release/tessera" "$TESSERA_PYTHON" -m pytest -q)
