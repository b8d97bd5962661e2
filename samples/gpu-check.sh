#!/usr/bin/env bash
# The Vulkan backend on a real GPU (issue 12), in one call of the device tool: the machine there may
# have no .NET SDK and no Vulkan loader, so both travel from here.
#
#   bash samples/gpu-check.sh prepare     # here: a self-contained `lora` in .gpu/, the loader's .debs in .gl/
#   run(command: "bash samples/gpu-check.sh run", carry: [".gpu", ".gl"], timeout_s: 540)   # there
#
# What it runs there, into $OUT/gpu-check.txt: the devices and their features; each tiny model trained
# 6 steps with AdamW, gradient accumulation and LCSB on the CPU and on the GPU (the losses must agree
# within 1e-4); `bench kernels`; and `bench step` on Qwen2.5-0.5B shapes, 4-bit, seq 256, on both.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
    grep -qx '/.gl/' .git/info/exclude 2>/dev/null || echo /.gl/ >> .git/info/exclude
    # Compressed: a self-contained .NET program is larger than the 64 MiB a call may carry.
    rm -rf .gpu /tmp/gpu-publish && mkdir .gpu
    dotnet publish samples/LoraCompiler.Cli -c Release -r linux-x64 --self-contained -o /tmp/gpu-publish/lora >/dev/null
    tar -C /tmp/gpu-publish -cJf .gpu/lora.tar.xz lora
    mkdir -p .gl /tmp/amd64/partial
    o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    # shellcheck disable=SC2086
    apt-get $o update >/dev/null && (cd .gl && apt-get $o download libvulkan1 >/dev/null)
    du -sh .gpu .gl
    ;;
run)
    if ! ldconfig -p | grep -q libvulkan; then
        for f in .gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    fi
    if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
        export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    fi
    out="${OUT:-/tmp}/gpu-check.txt"
    work=$(mktemp -d)
    tar -C "$work" -xJf .gpu/lora.tar.xz
    lora="$work/lora/lora"
    {
        echo "== nvidia-smi"; (nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true)
        echo "== the run on the CPU and on the GPU: losses of 6 steps (AdamW, --grad-accum 2, --lcsb-groups 2)"
        python3 -c "print('The quick brown fox jumps over the lazy dog. ' * 400)" > "$work/data.txt"
        for model in tiny-qwen2 tiny-llama tiny-gemma3 tiny-qwen3; do
            "$lora" init-random --model "$model" --out "$work/$model-w" > /dev/null
            for backend in cpu vulkan; do
                "$lora" train --model "$model" --weights "$work/$model-w" --data "$work/data.txt" --out "$work/$model-$backend" \
                    --steps 6 --seq 64 --grad-accum 2 --lcsb-groups 2 --backend "$backend" > "$work/$model-$backend.log" 2>&1 \
                    || { echo "$model on $backend failed:"; tail -3 "$work/$model-$backend.log"; }
            done
            paste -d, "$work/$model-cpu/metrics.csv" "$work/$model-vulkan/metrics.csv" | awk -F, -v m="$model" \
                'NR > 1 { d = $2 - $9; if (d < 0) d = -d; if (d > worst) worst = d } END { printf "%s: largest loss difference %.2e %s\n", m, worst, (worst < 1e-4 ? "ok" : "TOO LARGE") }'
        done
        # GPU_CHECK_BENCH=0 leaves the benchmarks out (to try the script on lavapipe, where they take long).
        if [ "${GPU_CHECK_BENCH:-1}" = 1 ]; then
            echo "== bench kernels"; "$lora" bench kernels --backend all --seconds 2
            echo "== bench step (Qwen2.5-0.5B shapes, 4-bit, seq 256)"; "$lora" bench step --model qwen2.5-0.5b --seq 256 --steps 3 --quantize q4 --backend all
        fi
    } 2>&1 | tee "$out"
    rm -rf "$work"
    ;;
*)
    echo "usage: bash samples/gpu-check.sh prepare|run" >&2
    exit 2
    ;;
esac
