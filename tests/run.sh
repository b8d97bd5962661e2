#!/usr/bin/env bash
# Runs the whole test suite. Works on a fresh Debian machine with the .NET SDK: anything else the
# tests need is installed here when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# TorchSharp (the autograd reference) comes from NuGet, and its libstdc++ version requirement is
# patched at build time (tests/LoraCompiler.Tests/TorchSharpFix.targets). The Vulkan backend needs the
# loader, Mesa's lavapipe, the validation layers and glslc (the build compiles shaders/ with it).
tests/install-vulkan.sh
# Distributed training: the MPI tests run `mpirun -np 2 --oversubscribe lora train ...`.
tests/install-mpi.sh

results="$(mktemp -d)"
status=0
dotnet test tests/LoraCompiler.Tests -c Release --logger "trx;LogFileName=results.trx" \
    --results-directory "$results" "$@" || status=$?

# One plain closing line, 'N passed, N failed', read from the test results.
if [ -f "$results/results.trx" ]; then
    counters=$(grep -o '<Counters [^>]*>' "$results/results.trx" | head -n 1)
    passed=$(sed -n 's/.* passed="\([0-9]*\)".*/\1/p' <<<"$counters")
    failed=$(sed -n 's/.* failed="\([0-9]*\)".*/\1/p' <<<"$counters")
    skipped=$(sed -n 's/.* notExecuted="\([0-9]*\)".*/\1/p' <<<"$counters")
    echo "${passed:-0} passed, ${failed:-0} failed, ${skipped:-0} skipped"
fi
rm -rf "$results"
exit $status
