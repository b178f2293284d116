#!/usr/bin/env bash
# Run the GPU tier, the PTX check, the benchmarks and the config sweep on the GPU machine.
#
#   bash bench/run_on_gpu.sh STEP [STEP ...]     (from the repository root)
#
# STEPs: guards | fused-gate-add | tests | tests-gluon-row | tests-sm8x | tests-comfy | tests-fused | tests-blocks | tests-blocks-gpu | tests-fastpath | blocks | ptx | bench | sustained | bench-quick | model | model-compile | lora | profile | fused | model-9b | model-9b-sm8x | model-9b-lora | model-attn8 | attention | attention-16bit | attention-defer | attention-safe | attention-gluon | attention-ncu | attention-pass | lean-checks | host | host-mode | gemm-ws | gemm-ws-residual | gemm-wide | gemm-gluon | gemm-tail | glu | glu-tests | glu-bench | glu-ab | sweep-{large,m1024,m256,m64,small}
#        arch-eager | arch-compile | arch-dvram (MODELS="zimage chroma" VARIANTS=... ; bench/bench_arch.py)
# Results go to $OUT (the device tool brings that folder back) or ./gpu-out.
# Wheels in .whl/ (comfy-kitchen without its HIP library) are installed into /tmp/site first; the
# package is imported as int8_w8a8 through a symlink, since the machine cannot pip install -e.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# tests-sm8x and model-9b-sm8x run the sm_8x path on this GPU, a stand-in for Ampere/Ada (~3 and ~4 min on the
# H200): INT8_W8A8_FORCE_ARCH=8.6 dispatches the mma.sync table and pointer-load kernel those GPUs get, and
# Triton's DISABLE_MMA_V3=1 lowers every dot to Ampere's mma.sync as on sm_8x (on sm_90 Triton would otherwise
# use wgmma for tiles of 64+ rows; part of Triton's cache key).
SM8X="INT8_W8A8_FORCE_ARCH=8.6 DISABLE_MMA_V3=1"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/int8_w8a8
export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-}
# a pruned ComfyUI checkout carried in .comfyui/ enables the GPU tier's ComfyUI tests
[ -f .comfyui/comfy/model_patcher.py ] && export COMFYUI_PATH=$PWD/.comfyui
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.limit,power.max_limit,clocks.max.sm \
    --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# the host's speed at tiny torch ops (what bounds eager steps; it differs between lent machines)
python3 -c "from int8_w8a8.bench import common; print('host', common.host_probe())" | tee -a "$OUT/gpu.txt"
# where the host runs against the GPU (bench/NOTES.md item 87: a slow host mode that may be a remote NUMA node)
python3 -c "from int8_w8a8.bench import common; print('placement', common.cpu_placement())" | tee -a "$OUT/gpu.txt"
{ nvidia-smi topo -m; lscpu | grep -iE "numa|^cpu\(s\)|model name"; } >> "$OUT/gpu.txt" 2>&1
# PYTEST_WORKERS=N runs the test steps in N processes on the one GPU (pytest-xdist is on the machine):
# most of their time is Triton compiling on the CPU
XDIST=${PYTEST_WORKERS:+-n $PYTEST_WORKERS}
status=0
for step in "$@"; do
    echo "=== $step ==="
    start=$SECONDS
    case "$step" in
        tests) python3 -m pytest tests -m "kernels or gpu" $XDIST -q -p no:randomly 2>&1 | tee "$OUT/pytest.log" | tail -25 ;;
        tests-sm8x) env $SM8X python3 -m pytest tests -m "kernels or gpu" $XDIST -q -p no:randomly 2>&1 \
            | tee "$OUT/pytest-sm8x.log" | tail -25 ;;
        tests-comfy) python3 -m pytest tests/test_gpu_comfy.py -q -x 2>&1 | tee "$OUT/pytest-comfy.log" | tail -40 ;;
        # the fused blocks of every architecture through ComfyUI on the GPU (test_fused.py runs in `tests`);
        # test_blocks_gpu.py: each architecture at its real widths with 1-2 blocks (~20 GiB per test at most)
        tests-blocks) python3 -m pytest tests/test_flux_fused.py tests/test_blocks_*.py $XDIST -q -p no:randomly 2>&1 \
            | tee "$OUT/pytest-blocks.log" | tail -15 ;;
        # only the real-width module, its SQNR and peak-memory lines kept in the log (-rP: passed tests' output)
        tests-blocks-gpu) python3 -m pytest tests/test_blocks_gpu.py $XDIST -q -rP -p no:randomly 2>&1 \
            | tee "$OUT/pytest-blocks-gpu.log" | grep -E '^\[|passed|failed|Error' | tail -60 ;;
        tests-fused) python3 -m pytest tests/test_fused.py tests/test_flux_fused.py tests/test_blocks_*.py $XDIST -q \
            -p no:randomly 2>&1 \
            | tee "$OUT/pytest-fused.log" | tail -15 ;;
        blocks) python3 -m int8_w8a8.bench.bench_blocks --out "$OUT/bench_blocks.json" 2>&1 | tee "$OUT/bench_blocks.txt" ;;
        ptx) python3 -m int8_w8a8.bench.check_ptx --arch 90 2>&1 | tee "$OUT/ptx.txt" ;;
        bench) python3 -m int8_w8a8.bench.bench_linear --out "$OUT/bench_linear.json" 2>&1 | tee "$OUT/bench_linear.txt" ;;
        # SUSTAINED_ARGS: e.g. "--shapes zimage --no-extra --seconds 2"
        sustained) python3 -m int8_w8a8.bench.sustained_gemm ${SUSTAINED_ARGS:-} --out "$OUT/sustained_gemm.json" 2>&1 \
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
        # Dynamo's guards on a compiled step and their cache-lookup time per variant (bench/guard_report.py; ~1 min
        # per variant at real widths, eager backend)
        guards) python3 -m int8_w8a8.bench.guard_report --models ${MODELS:-zimage} \
            --variants ${VARIANTS:-bf16 fp8-fast pack-convert} ${GUARD_ARGS:-} --out "$OUT/guards.json" 2>&1 \
            | tee "$OUT/guards.txt" ;;
        # the one-pass post-norm add + quantization against the two kernels (bench_fused --only gate-add-quant)
        fused-gate-add) python3 -m int8_w8a8.bench.bench_fused --only gate-add-quant --out "$OUT/bench_fused_gate_add.json" \
            2>&1 | tee "$OUT/bench_fused_gate_add.txt" ;;
        fused) python3 -m int8_w8a8.bench.bench_fused --out "$OUT/bench_fused.json" 2>&1 | tee "$OUT/bench_fused.txt" ;;
        # FLUX.2 klein 9B step, fused pack with ComfyUI's attention vs 8-bit attention (issue 14: >= 1.1x at 1024,
        # >= 1.3x at 2048, SQNR vs BF16 down by <= 2 dB); ~3 min on the H200
        model-attn8) python3 -m int8_w8a8.bench.bench_model --models klein9b --res ${RES:-1024 2048} \
            --variants ${VARIANTS:-bf16 pack-row-attn16 pack-row-attn8} --out "$OUT/bench_model_attn8.json" 2>&1 \
            | tee "$OUT/bench_model_attn8.txt" ;;
        model-9b) python3 -m int8_w8a8.bench.bench_model --models klein9b --res ${RES:-1024} \
            --variants ${VARIANTS:-bf16 comfy-int8 pack-row pack-row-unfused} --out "$OUT/bench_model_9b.json" 2>&1 \
            | tee "$OUT/bench_model_9b.txt" ;;
        model-9b-sm8x) mkdir -p /tmp/sm8x-ref && (
            echo "--- klein 9B step, Hopper path (as dispatched on this GPU) ---" &&
            python3 -m int8_w8a8.bench.bench_model --models klein9b --res ${RES:-1024} --variants bf16 pack-row \
                --ref-dir /tmp/sm8x-ref --out "$OUT/bench_model_9b_hopper.json" &&
            echo "--- sm_8x path on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) ($SM8X), a stand-in for Ampere/Ada; x BF16 from the BF16 row above, SQNR vs its output ---" &&
            env $SM8X python3 -m int8_w8a8.bench.bench_model --models klein9b --res ${RES:-1024} \
                --variants pack-row --ref-dir /tmp/sm8x-ref --out "$OUT/bench_model_9b_sm8x.json"
            ) 2>&1 | tee "$OUT/bench_model_9b_sm8x.txt" ;;
        # klein 9B at 1024x1024 (~3 min): the fused pack without and with a random rank-64 dynamic LoRA on every
        # linear (lora/dynamic.py), "LoRA +%" the overhead (target <= 15%), SQNR vs BF16 + the same LoRA;
        # VARIANTS="... pack-row-unfused-lora64" adds the LoRA on ComfyUI's blocks (the path before bench/NOTES.md item 24)
        model-9b-lora) python3 -m int8_w8a8.bench.bench_model --models klein9b --res ${RES:-1024} \
            --variants ${VARIANTS:-bf16-lora64 pack-row pack-row-lora64} --out "$OUT/bench_model_9b_lora.json" 2>&1 \
            | tee "$OUT/bench_model_9b_lora.txt" ;;
        host) python3 -m int8_w8a8.bench.profile_host --out "$OUT/profile_host.json" 2>&1 | tee "$OUT/profile_host.txt" ;;
        # the host's slow mode (bench/NOTES.md item 87; ~7 min): one INT8 linear's host cost direct / through torch.ops /
        # compiled, before and after compiling, unpinned and on the GPU's local CPUs; then the pack's eager and compiled
        # rows (MODELS, default Qwen-Image) unpinned and pinned, each with its per-run CPU, NUMA node and host probe;
        # the rows do not wait for the host to settle (--settle-s 0: this step observes the slow mode, item 88)
        host-mode) for pin in "" --pin-gpu-cpus; do tag=${pin:+-pinned}
                python3 -m int8_w8a8.bench.compile_host $pin --out "$OUT/compile_host$tag.json" 2>&1 \
                    | tee "$OUT/compile_host$tag.txt"; done
            for pin in "" --pin-gpu-cpus; do tag=${pin:+-pinned}; m=${MODELS:-qwen-image}
                python3 -m int8_w8a8.bench.bench_arch --models $m --variants ${VARIANTS:-pack-convert} \
                    --modes eager compile --reps 15 --settle-s 0 $pin --out "$OUT/bench_arch_host_mode_${m// /_}$tag.json" 2>&1 \
                    | tee "$OUT/bench_arch_host_mode_${m// /_}$tag.txt"; done ;;
        # ARCH_ARGS: more bench_arch arguments (e.g. "--trace-dir $OUT/traces": a Chrome trace of each row's step;
        # "--overlap": the variants' processes build and compile together and take turns for their timed steps,
        # bench/turns.py; for compiled pairs whose models fit in GPU memory together)
        # one architecture's five eager variants take ~3-4 min (one process each); Qwen-Image and Wan ~5 min;
        # VARIANTS="pack-convert pack-convert-lora64" measures the dynamic LoRA's cost (bf16-lora64: its SQNR reference)
        arch-eager) m=${MODELS:-zimage}; python3 -m int8_w8a8.bench.bench_arch --models $m --modes eager \
            --variants ${VARIANTS:-bf16 fp8-fast comfy-int8 pack-native pack-convert} --ref-dir /tmp/int8_w8a8-arch-refs ${ARCH_ARGS:-} \
            --out "$OUT/bench_arch_eager_${m// /_}.json" 2>&1 | tee "$OUT/bench_arch_eager_${m// /_}.txt" ;;
        arch-compile) m=${MODELS:-zimage}; python3 -m int8_w8a8.bench.bench_arch --models $m --modes compile \
            --variants ${VARIANTS:-bf16 fp8-fast pack-convert} --ref-dir /tmp/int8_w8a8-arch-refs ${ARCH_ARGS:-} \
            --out "$OUT/bench_arch_compile_${m// /_}.json" 2>&1 | tee "$OUT/bench_arch_compile_${m// /_}.txt" ;;
        # ComfyUI's default memory mode on NVIDIA (DynamicVRAM, comfy-aimdo from .whl): weights in host memory, staged in
        # VRAM as layers run; every layer has comfy_cast_weights set, so the pack's layers take the cast path
        arch-dvram) m=${MODELS:-zimage}; python3 -m int8_w8a8.bench.bench_arch --models $m --modes eager-dvram \
            --variants ${VARIANTS:-bf16 fp8-fast pack-convert} --ref-dir /tmp/int8_w8a8-arch-refs ${ARCH_ARGS:-} \
            --out "$OUT/bench_arch_dvram_${m// /_}.json" 2>&1 | tee "$OUT/bench_arch_dvram_${m// /_}.txt" ;;
        tests-fastpath) python3 -m pytest tests/test_fastpath.py tests/test_fastpath_fused.py tests/test_lora_fused.py $XDIST -q -p no:randomly 2>&1 | tee "$OUT/pytest-fastpath.log" \
            | tail -15 ;;
        # the warp-specialized variants first, under a timeout: an mbarrier deadlock must not eat the call
        attention-safe) INT8_W8A8_TEST_WS=1 timeout 240 python3 -m pytest tests/test_attention.py -q -p no:randomly -k "(gpu_variants and ws) or warp_spec" 2>&1 \
                | tee "$OUT/pytest-attention-ws.log" | tail -5 \
            && { timeout 420 python3 -m int8_w8a8.bench.bench_attention --out "$OUT/bench_attention.json" 2>&1 \
                | tee "$OUT/bench_attention.txt"; } ;;
        attention) { python3 -m pytest tests/test_attention.py -q -p no:randomly 2>&1 | tail -15; python3 -m int8_w8a8.bench.check_ptx_attention; python3 -m int8_w8a8.bench.bench_attention --out "$OUT/bench_attention.json"; } 2>&1 | tee "$OUT/bench_attention.txt" ;;
        # INT8 Q K^T with a 16-bit P V (bench/NOTES.md item 68): the attention GPU tests (every variant at model sizes,
        # the warp-specialized 16-bit one under a timeout), then the 16-bit variants against the default and cuDNN at
        # Wan's, issue 14's long and short shapes
        attention-16bit) { timeout 300 python3 -m pytest tests/test_attention.py -q -p no:randomly 2>&1 | tail -8; \
                INT8_W8A8_TEST_WS=1 timeout 120 python3 -m pytest tests/test_attention.py -q -p no:randomly \
                -k "gpu_variants and 16bit and ws" 2>&1 | tail -3; timeout 360 python3 -m int8_w8a8.bench.bench_attention \
                --variants 16bit --shapes ${SHAPES:-40:14040,32:16896,24:4608,32:4608} \
                --out "$OUT/bench_attention_16bit.json"; } 2>&1 | tee "$OUT/bench_attention_16bit.txt" ;;
        # P V one block late (defer_pv, bench/NOTES.md item 70): the attention GPU tests, then the deferred variants
        # against the block-order ones and cuDNN at Wan's, issue 14's long and short shapes
        attention-defer) { timeout 300 python3 -m pytest tests/test_attention.py -q -p no:randomly 2>&1 | tail -8; \
                timeout 300 python3 -m int8_w8a8.bench.bench_attention \
                --variants ${PREFIXES:-16bit-64x128-w4-s2} \
                --shapes ${SHAPES:-40:14040,32:16896,24:4608,32:4608} --out "$OUT/bench_attention_defer.json"; } 2>&1 \
            | tee "$OUT/bench_attention_defer.txt" ;;
        # session 24's lean forms (bench/NOTES.md items 80, 81, 83; the defaults since session 25, item 86): their GPU tests (the lean attention pass,
        # quantize_rows' lean form and every GLU variant bit for bit against the general forms), both forms of the pass
        # timed per kernel, every GLU variant at every shape (`bench_fused --only glu`, with its code check), quantize_rows'
        # two forms (`--only rows`); ~8 min with PYTEST_WORKERS=8
        lean-checks) { timeout 240 python3 -m pytest tests/test_attention.py tests/test_fused.py tests/test_kernels.py \
                -k "lean or glu" $XDIST -q -p no:randomly 2>&1 | tail -5; \
                timeout 150 python3 -m int8_w8a8.bench.bench_attention --default-only \
                --shapes ${SHAPES:-40:14040,32:16896,24:4608} --profile-pass --out "$OUT/bench_attention_pass.json"; \
                timeout 330 python3 -m int8_w8a8.bench.bench_fused --only glu --out "$OUT/bench_fused_glu.json"; \
                timeout 60 python3 -m int8_w8a8.bench.bench_fused --only rows --out "$OUT/bench_fused_rows.json"; } 2>&1 \
            | tee "$OUT/lean_checks.txt" ;;
        # the 8-bit attention's quantization pass (bench/NOTES.md items 62-63): GPU tests, then the default config at
        # Wan's and issue 14's long shapes, flushed single calls and queued back to back, and the pass per kernel
        attention-pass) { timeout 300 python3 -m pytest tests/test_attention.py tests/test_blocks_attention.py -q \
                -p no:randomly 2>&1 | tail -5; timeout 240 python3 -m int8_w8a8.bench.bench_attention --default-only \
                --shapes ${SHAPES:-40:14040,32:16896,24:4608} --profile-pass --out "$OUT/bench_attention_pass.json"; } 2>&1 \
            | tee "$OUT/bench_attention_pass.txt" ;;
        # Hopper's large-M rows at wide outputs (bench/NOTES.md item 71): the Gluon row, the warp-specialized one, the plain
        # one and cuBLAS FP8, bit for bit, ~1 min
        gemm-wide) python3 -m int8_w8a8.bench.sweep_gemm --bucket wide --out "$OUT/sweep_gemm_wide.json" 2>&1 \
            | tee "$OUT/sweep_gemm_wide.txt" ;;
        # the opt-in warp-specialized GEMM configs vs the table config and cuBLAS FP8 at Z-Image / klein 9B shapes
        # (~2 min): their bit-identity tests first (the bench runs either way), each under a timeout (an mbarrier
        # deadlock must not eat the call)
        gemm-ws) timeout 240 python3 -m pytest tests/test_kernels.py -q -p no:randomly -k "ws_gemm or ws_config" 2>&1 \
                | tee "$OUT/pytest-gemm-ws.log" | tail -5; \
            { timeout 300 python3 -m int8_w8a8.bench.sweep_gemm --bucket ws --out "$OUT/sweep_ws.json" 2>&1 \
                | tee "$OUT/sweep_ws.txt"; } ;;
        # residual-epilogue configs (warp-specialized and unspecialized 128 x 256, 64 x 256, 128 x 128 x 128) vs
        # the plain one (~2-3 min)
        gemm-ws-residual) timeout 300 python3 -m int8_w8a8.bench.sweep_gemm --bucket ws-residual \
            --out "$OUT/sweep_ws_residual.json" 2>&1 | tee "$OUT/sweep_ws_residual.txt" ;;
        # the Gluon INT8 GEMM with its wgmma products left in flight (kernels/gluon_gemm.py, NOTES item 56): GPU tests,
        # then bit identity and timing against the table's kernel and cuBLAS FP8 (~2-3 min)
        gemm-gluon) timeout 300 python3 -m pytest tests/test_gluon_gemm.py -q -p no:randomly 2>&1 \
                | tee "$OUT/pytest-gluon-gemm.log" | tail -5; \
            { timeout 300 python3 -m int8_w8a8.bench.bench_gluon_gemm --out "$OUT/bench_gluon_gemm.json" 2>&1 \
                | tee "$OUT/bench_gluon_gemm.txt"; } ;;
        # the Gluon GEMM's GPU tests alone, PYTEST_K selecting (e.g. "256 or replays": the 256-wide row, item 92)
        gemm-gluon-tests) timeout 240 python3 -m pytest tests/test_gluon_gemm.py -q -p no:randomly -k "${PYTEST_K:-}" \
                2>&1 | tee "$OUT/pytest-gluon-gemm.log" | tail -5 ;;
        # the SwiGLU GEMM (kernels.fused.glu_gemm / split_glu_gemm, bench/NOTES.md items 89-90; opt-in): its GPU tests
        # and the blocks' at real widths with it on (Z-Image's and FLUX.2's blocks take it on this row), then (;&, as
        # glu-bench alone) a SwiGLU MLP's input both ways at Z-Image's and klein's shapes and klein's single-block
        # linear1 three ways (~3-4 min); glu-tests: its own GPU tests alone
        glu) INT8_W8A8_GLU_GEMM=1 timeout 360 python3 -m pytest tests/test_glu_gemm.py tests/test_gluon_gemm.py \
                tests/test_blocks_gpu.py tests/test_fused.py $XDIST -q -p no:randomly -k "glu or zimage or klein9b" 2>&1 \
                | tee "$OUT/pytest-glu.log" | tail -8 ;&
        glu-bench) timeout 300 python3 -m int8_w8a8.bench.bench_gluon_gemm --glu --out "$OUT/bench_glu.json" 2>&1 \
                | tee "$OUT/bench_glu.txt" ;;
        glu-tests) INT8_W8A8_GLU_GEMM=1 timeout 300 python3 -m pytest tests/test_glu_gemm.py $XDIST -q -p no:randomly 2>&1 \
                | tee "$OUT/pytest-glu-gemm.log" | tail -8 ;;
        # whole steps (MODES, default eager; MODELS, default "zimage klein9b") without and with the SwiGLU GEMM in one
        # call: bench_arch's pack-convert and pack-convert-glugemm variants (VARIANTS to add fp8-fast, ARCH_ARGS --overlap)
        glu-ab) m=${MODELS:-zimage klein9b}; python3 -m int8_w8a8.bench.bench_arch --models $m --modes ${MODES:-eager} \
                --variants ${VARIANTS:-pack-convert pack-convert-glugemm} --ref-dir /tmp/int8_w8a8-arch-refs ${ARCH_ARGS:-} \
                --out "$OUT/bench_arch_glu_ab_${m// /_}.json" 2>&1 | tee "$OUT/bench_arch_glu_ab_${m// /_}.txt" ;;
        # Hopper's large-M GEMM row in Gluon (configs.HOPPER_GLUON_TABLE) where it runs: through the public API, the
        # eager replays (kernels/direct.py) and the fused blocks at the real widths (~2-3 min; gemm-gluon: the kernel's own)
        tests-gluon-row) timeout 300 python3 -m pytest tests/test_gluon_gemm.py tests/test_gpu.py tests/test_fastpath.py \
                tests/test_blocks_gpu.py -q -p no:randomly -k "table_row or not test_gluon_gemm" 2>&1 \
                | tee "$OUT/pytest-gluon-row.log" | tail -8 ;;
        # the Gluon 8-bit attention with a product in flight across each softmax (kernels/gluon_attention.py, NOTES
        # item 57): GPU tests, then the default Triton config, the Gluon configs and cuDNN at S = 4608 and 16896 (~3 min)
        attention-gluon) timeout 300 python3 -m pytest tests/test_gluon_attention.py -q -p no:randomly 2>&1 \
                | tee "$OUT/pytest-gluon-attention.log" | tail -5; \
            { timeout 300 python3 -m int8_w8a8.bench.bench_attention --default-only --shapes 32:4608,32:16896 \
                --out "$OUT/bench_attention_gluon.json" 2>&1 | tee "$OUT/bench_attention_gluon.txt"; } ;;
        # Nsight Compute on the Gluon attention at Wan's shape (bench/NOTES.md item 75; ~1 min): the report, its
        # per-instruction source page and details as CSV, and bench/ncu_report.py's stall and hot-loop summary
        attention-ncu) N=${NCU:-/usr/local/cuda/bin/ncu}; timeout 300 "$N" -k regex:_gluon_ws -s 1 -c 1 --set full \
                --import-source no -f -o "$OUT/ws" python3 -m int8_w8a8.bench.probe_gluon_ws --ncu \
                --shapes ${SHAPES:-40:14040} --configs ${CONFIGS:-4dp} > "$OUT/ncu.log" 2>&1; \
            "$N" -i "$OUT/ws.ncu-rep" --page source --csv --print-source sass > "$OUT/ws_sass.csv"; \
            "$N" -i "$OUT/ws.ncu-rep" --page details --csv > "$OUT/ws_details.csv"; \
            python3 -m int8_w8a8.bench.ncu_report "$OUT/ws_sass.csv" | tee "$OUT/ncu_report.txt" ;;
        # the opt-in split tail (stream-K for the last wave, configs.GemmConfig.split_tail) vs the table config at the
        # wave-quantized shapes of Z-Image, klein and Chroma (~2 min): bit-identity tests first, under a timeout
        gemm-tail) timeout 240 python3 -m pytest tests/test_kernels.py $XDIST -q -p no:randomly -k "split_tail or tail_plan" 2>&1 \
                | tee "$OUT/pytest-gemm-tail.log" | tail -5; \
            { timeout 300 python3 -m int8_w8a8.bench.sweep_gemm --bucket tail --out "$OUT/sweep_tail.json" 2>&1 \
                | tee "$OUT/sweep_tail.txt"; } ;;
        sweep-*) python3 -m int8_w8a8.bench.sweep_gemm --bucket "${step#sweep-}" --out "$OUT/sweep_${step#sweep-}.json" \
            2>&1 | tee "$OUT/sweep_${step#sweep-}.txt" ;;
        *) echo "unknown step $step"; status=2 ;;
    esac
    [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
    echo "=== $step took $((SECONDS - start)) s ==="
done
exit $status
