#!/usr/bin/env bash
# Run the GPU tier, the PTX check, the benchmarks and the config sweep on the GPU machine.
#
#   bash bench/run_on_gpu.sh STEP [STEP ...]     (from the repository root)
#
# STEPs: tests | tests-comfy | tests-fused | blocks | ptx | bench | sustained | bench-quick | model | model-compile | lora | profile | fused | model-9b | host | sweep-{large,m1024,m256,m64,small}
# Results go to $OUT (the device tool brings that folder back) or ./gpu-out.
# Wheels in .whl/ (comfy-kitchen without its HIP library) are installed into /tmp/site first; the
# package is imported as int8_w8a8 through a symlink, since the machine cannot pip install -e.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/int8_w8a8
export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-}
# a pruned ComfyUI checkout carried in .comfyui/ enables the GPU tier's ComfyUI tests
[ -f .comfyui/comfy/model_patcher.py ] && export COMFYUI_PATH=$PWD/.comfyui
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
status=0
for step in "$@"; do
    echo "=== $step ==="
    start=$SECONDS
    case "$step" in
        tests) python3 -m pytest tests -m "kernels or gpu" -q -p no:randomly 2>&1 | tee "$OUT/pytest.log" | tail -25 ;;
        tests-comfy) python3 -m pytest tests/test_gpu_comfy.py -q -x 2>&1 | tee "$OUT/pytest-comfy.log" | tail -40 ;;
        tests-fused) python3 -m pytest tests/test_fused.py tests/test_flux_fused.py -q -p no:randomly 2>&1 \
            | tee "$OUT/pytest-fused.log" | tail -15 ;;
        blocks) python3 -m int8_w8a8.bench.bench_blocks --out "$OUT/bench_blocks.json" 2>&1 | tee "$OUT/bench_blocks.txt" ;;
        ptx) python3 -m int8_w8a8.bench.check_ptx --arch 90 2>&1 | tee "$OUT/ptx.txt" ;;
        bench) python3 -m int8_w8a8.bench.bench_linear --out "$OUT/bench_linear.json" 2>&1 | tee "$OUT/bench_linear.txt" ;;
        sustained) python3 -m int8_w8a8.bench.sustained_gemm --out "$OUT/sustained_gemm.json" 2>&1 \
            | tee "$OUT/sustained_gemm.txt" ;;
        bench-quick) python3 -m int8_w8a8.bench.bench_linear --quick --out "$OUT/bench_linear.json" 2>&1 \
            | tee "$OUT/bench_linear.txt" ;;
        model) python3 -m int8_w8a8.bench.bench_model --res 512 1024 2048 --out "$OUT/bench_model.json" 2>&1 \
            | tee "$OUT/bench_model.txt" ;;
        model-compile) python3 -m int8_w8a8.bench.bench_model --models ${MODELS:-klein9b} --res ${RES:-1024} --compile --isolate \
            --variants ${VARIANTS:-bf16 pack-row} --out "$OUT/bench_model_compile.json" 2>&1 | tee "$OUT/bench_model_compile.txt" ;;
        lora) python3 -m int8_w8a8.bench.bench_lora --out "$OUT/bench_lora.json" 2>&1 | tee "$OUT/bench_lora.txt" ;;
        profile) python3 -m int8_w8a8.bench.profile_step --variants ${VARIANTS:-bf16 pack-row} ${PROFILE_ARGS:-} \
            --out "$OUT/profile_step.json" 2>&1 | tee "$OUT/profile_step.txt" ;;
        fused) python3 -m int8_w8a8.bench.bench_fused --out "$OUT/bench_fused.json" 2>&1 | tee "$OUT/bench_fused.txt" ;;
        model-9b) python3 -m int8_w8a8.bench.bench_model --models klein9b --res ${RES:-1024} \
            --variants ${VARIANTS:-bf16 comfy-int8 pack-row pack-row-unfused} --out "$OUT/bench_model_9b.json" 2>&1 \
            | tee "$OUT/bench_model_9b.txt" ;;
        host) python3 -m int8_w8a8.bench.profile_host 2>&1 | tee "$OUT/profile_host.txt" ;;
        attention) { python3 -m pytest tests/test_attention.py -q -p no:randomly 2>&1 | tail -15; python3 -m int8_w8a8.bench.check_ptx_attention; python3 -m int8_w8a8.bench.bench_attention --out "$OUT/bench_attention.json"; } 2>&1 | tee "$OUT/bench_attention.txt" ;;
        sweep-*) python3 -m int8_w8a8.bench.sweep_gemm --bucket "${step#sweep-}" --out "$OUT/sweep_${step#sweep-}.json" \
            2>&1 | tee "$OUT/sweep_${step#sweep-}.txt" ;;
        *) echo "unknown step $step"; status=2 ;;
    esac
    [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
    echo "=== $step took $((SECONDS - start)) s ==="
done
exit $status
