#!/usr/bin/env bash
# Data parallel over Open MPI on this machine: `mpirun -np 2` ranks of one thread each against one
# process of two threads, both taking the same two sequences per step (the process with
# --grad-accum 2), on random weights of the real shapes. Prints the step times, the speedup, the
# bytes all-reduced per step, and what those bytes cost over a 1 Gb/s network; then the same two
# ranks over TCP (loopback), the transport between machines.
#   samples/bench-mpi.sh [DIR]          MODEL, SEQ, STEPS override qwen2.5-0.5b (4-bit), 128, 5
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-runs/bench-mpi}"
model="${MODEL:-qwen2.5-0.5b}"; seq="${SEQ:-128}"; steps="${STEPS:-5}"

tests/install-vulkan.sh glslc   # the runtime's build compiles shaders/*.comp with glslc
tests/install-mpi.sh
dotnet build samples/LoraCompiler.Cli -c Release -v quiet -nologo >/dev/null
dll="$PWD/samples/LoraCompiler.Cli/bin/Release/net10.0/lora.dll"
lora() { dotnet "$dll" "$@"; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1   # mpirun refuses root without both

mkdir -p "$dir"
[ -f "$dir/base/model.safetensors" ] || lora init-random --model "$model" --out "$dir/base" --seed 1 --quantize q4 >/dev/null
train=(train --model "$model" --weights "$dir/base" --data README.md --steps "$steps" --seq "$seq" --data-format bytes --lr 1e-3 --seed 1 --overwrite)

# Seconds per step after the first (warm-up), from metrics.csv's elapsed_seconds.
per_step() { awk -F, 'NR == 2 { first = $5 } NR > 1 { last = $5; n++ } END { printf "%.3f", (last - first) / (n - 1) }' "$1/metrics.csv"; }

echo "== one process, 2 threads, --grad-accum 2"
DOTNET_PROCESSOR_COUNT=2 lora "${train[@]}" --out "$dir/one" --grad-accum 2 | grep -E "^(Training|step)"
echo "== mpirun -np 2, 1 thread each (shared memory)"
mpirun -np 2 --bind-to core -x DOTNET_PROCESSOR_COUNT=1 dotnet "$dll" "${train[@]}" --out "$dir/two" | tee "$dir/two.log" | grep -E "^(Data|step|All-reduced)"
echo "== mpirun -np 2, 1 thread each, over TCP (loopback)"
mpirun -np 2 --bind-to core --mca btl tcp,self -x DOTNET_PROCESSOR_COUNT=1 dotnet "$dll" "${train[@]}" --out "$dir/tcp" | grep -E "^(step|All-reduced)"

one=$(per_step "$dir/one"); two=$(per_step "$dir/two"); tcp=$(per_step "$dir/tcp")
mb=$(sed -n 's/^All-reduced \([0-9.]*\) MB.*/\1/p' "$dir/two.log")
echo
echo "$model, seq $seq, 2 sequences per step, $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
echo "one process of 2 threads:  $one s/step"
echo "2 ranks of 1 thread (shm): $two s/step   speedup $(awk -v a="$one" -v b="$two" 'BEGIN { printf "%.2fx", a / b }')"
echo "2 ranks of 1 thread (tcp): $tcp s/step   speedup $(awk -v a="$one" -v b="$tcp" 'BEGIN { printf "%.2fx", a / b }')"
echo "all-reduced per step: $mb MB of LoRA gradients (float32)"
# A ring all-reduce sends 2(N-1)/N of the buffer per rank: the buffer itself for N = 2, twice it for large N.
awk -v mb="$mb" 'BEGIN { printf "over 1 Gb/s: %.3f s per step for 2 ranks, %.3f s for many (ring all-reduce, bandwidth alone)\n", mb * 8 / 1000, 2 * mb * 8 / 1000 }'
echo "the adapters of the two runs, all tensors as one vector:"
lora compare-grads "$dir/one/adapter_model.safetensors" "$dir/two/adapter_model.safetensors" | grep -E "cosine|norms"
