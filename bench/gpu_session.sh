#!/usr/bin/env bash
# Every GPU measurement the open issues need, in two device calls (docs: BENCHMARKS.md, bench/*.py).
#
#   bash bench/gpu_session.sh OUT [SECONDS]          # first call
#   bash bench/gpu_session.sh OUT --collect SECONDS  # right after, on the same warm machine
#   bash bench/gpu_session.sh OUT --short            # one call of about 280 s: FP8 check, attention, indexer, MoE, demo
#   bash bench/gpu_session.sh OUT --steps            # one call of about 500 s: flash-mini's whole step, the engine's host cost
#   bash bench/gpu_session.sh OUT --slice [SECONDS]  # one call (585 s): flash-slice written, compiled, timed, profiled
#   bash bench/gpu_session.sh OUT --slice-baselines  # right after: the eager reference at batch 1 and 64, Inductor
#   bash bench/gpu_session.sh OUT --slice-unfused    # one call: flash-slice's step before the MoE lowering (issue 14)
#   bash bench/gpu_session.sh OUT --tune             # one call of about 300 s: the fused MoE's launch grid (issue 14)
#   bash bench/gpu_session.sh OUT --long             # one call of about 500 s: flash-slice at 4K and 64K, compressor
#   bash bench/gpu_session.sh OUT --quick [SECONDS]  # one call: flash-mini's step and the demo model at MTP 0..3
#                                                    # first, then the kernel benches with their Inductor baselines,
#                                                    # until SECONDS (570); --collect gathers the rest
#
# The first call starts a detached pipeline (setsid: it outlives the call while the machine stays held) that writes
# the flash-slice checkpoint on the GPU and compiles it (fused MoE, then `--moe unfused`) and the demo model. The
# foreground meanwhile runs the checks (CUDA graphs against the graph-free executor, the synthetic writer on the
# GPU, the fused MoE's rows whatever the step's size; they overlap the checkpoint's GPU writer), then the kernel
# benchmarks (FP8 GEMM, fused MoE, sparse attention, Lightning Indexer; by then the writer's GPU part is over and
# the compiles use only the CPU). The pipeline's timed GPU work starts when the foreground is done (kernels.done)
# and runs serially: the flash-slice step against eager and Inductor, the demo model at MTP 0..3, the
# batch-invariance check, the unfused MoE step, transformers' model. Each call waits up to SECONDS from its start
# for the pipeline, then copies what exists into OUT. Logs: /tmp/dsv4c-gpu/*.txt (their tails come back in
# bench_all.txt).
set -u
out=$(realpath -m "${1:?usage: gpu_session.sh OUT [SECONDS | --collect SECONDS]}")
work=/tmp/dsv4c-gpu
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 COLUMNS=200
t0=$(date +%s); stamp() { echo "== $(( $(date +%s) - t0 ))s $*"; }
# the flash-slice modes end their call by ${3:-585} s: `left` is the time a step may take (at least 5 s)
deadline=${3:-585}; left() { local l=$(( deadline - ($(date +%s) - t0) )); echo $(( l > 5 ? l : 5 )); }
slice_eager() {  # flash-slice against the eager reference at batches $1 (bf16 weights: 68 GB); marked done per batches
  local name=step_slice_eager_${1//,/_}  # batches 1,64 -> step_slice_eager_1_64
  stamp "eager $1"; timeout $(left) dsv4c bench $work/slice.dsv4c --batch $1 --mtp 0 --baselines eager \
                      --json $out/$name.json 2>&1 | grep -vE "^\s*$" | tail -20
  [ -f $out/$name.json ] && touch $work/$name.done
}
slice_profile() {  # the top kernels of one flash-slice step, batch 1
  stamp profile; timeout $(left) dsv4c bench $work/slice.dsv4c --context 256 --batch 1 --mtp 0 --steps 10 \
                   --baselines "" --profile 2>&1 | tail -36
}

collect() {
  local limit=$1
  while [ ! -f "$work/pipeline.done" ] && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do sleep 2; done
  cat "$work/pipeline.log"
  for f in step_fused.json step_fused.png step_unfused.json step_transformers.json demo.json step_mini.json \
      step_mini_inductor.json indexer.json moe.json attention.json; do
    [ -f "$work/$f" ] && cp "$work/$f" "$out/"
  done
  for f in "$work"/*.txt; do echo "#### $f"; tail -60 "$f"; done > "$out/bench_all.txt" 2>/dev/null
}

if [ "${2:-}" = "--collect" ]; then collect "${3:-540}"; exit 0; fi

python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . 2>&1 | tail -2
if ! command -v dsv4c >/dev/null; then  # the console script's folder may not be on PATH there
  dsv4c() { python3 -c "import sys; from dsv4c.compiler.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
  export -f dsv4c
fi
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda, torch.cuda.get_device_name())"
rm -f "$work/pipeline.done" "$work/kernels.done"
if [ "${2:-}" = "--short" ]; then  # one call of about 280 s: the demo model compiled meanwhile, then benched
  (dsv4c compile model/demo_model -o $work/demo.dsv4c --target h100 --max-seq-len 1024 --overwrite \
    > $work/compile_demo.txt 2>&1; touch $work/demo.done) &
  stamp fp8-check;  timeout 35 python3 bench/fp8_gemm_gpu_check.py 2>&1 | grep -E "PASS|FAIL|Error" | head -12
  stamp attention;  (cd bench && timeout 50 python3 attention_bench.py --contexts 4096 65536 --batches 1 32 --no-compile --json "$out/attention.json" 2>&1 | tail -12)
  stamp indexer;    (cd bench && timeout 40 python3 indexer_bench.py --contexts 4096 65536 --batches 1 32 --no-compile --json "$out/indexer.json" 2>&1 | tail -14)
  stamp moe;        timeout 55 python3 bench/moe_bench.py --t 1 8 32 64 128 --no-compile --json "$out/moe.json" 2>&1 | tail -10
  stamp moe-check;  timeout 35 python3 bench/moe_gpu_check.py 2>&1 | grep -E "CHECK|Error" | head -12
  stamp demo;       while [ ! -f $work/demo.done ]; do sleep 1; done; tail -3 $work/compile_demo.txt
  timeout 60 dsv4c bench $work/demo.dsv4c --context 512 --batch 1,8 --mtp 0,1,2,3 --baselines eager --json $out/demo.json 2>&1 | grep -vE "^\s*$" | tail -24
  stamp invariance; timeout 45 python3 bench/batch_invariance_check.py --artifact $work/demo.dsv4c 2>&1 | grep -E "PASS|FAIL|Error|ms" | head -30
  stamp done; exit 0
fi
if [ "${2:-}" = "--steps" ]; then  # one call of about 500 s: flash-mini's whole step, in the foreground: against
  # eager, with the MoE unfused (the step before the lowering), its profile, against Inductor; the engine's host cost
  dsv4c init-checkpoint --preset flash-mini --device cuda --overwrite $work/fm > $work/init_mini.txt 2>&1
  stamp compile;    (dsv4c compile $work/fm -o $work/unfused.dsv4c --target h100 --max-seq-len 4224 --moe unfused \
                       --jobs 8 --overwrite > $work/compile_unfused.txt 2>&1) &
  dsv4c compile $work/fm -o $work/mini.dsv4c --target h100 --max-seq-len 4224 --jobs 8 --overwrite \
    > $work/compile_mini.txt 2>&1
  wait; tail -1 $work/compile_mini.txt $work/compile_unfused.txt
  stamp bench-mini; timeout 230 dsv4c bench $work/mini.dsv4c --batch 1,8,64 --mtp 0,1 --baselines eager \
                      --json $out/step_mini.json --plot $out/step_mini.png 2>&1 | grep -vE "^\s*$" | tail -30
  stamp unfused;    timeout 90 dsv4c bench $work/unfused.dsv4c --batch 1,64 --mtp 0 --json $out/step_unfused.json 2>&1 \
                      | grep -vE "^\s*$" | tail -8
  stamp profile;    timeout 40 dsv4c bench $work/mini.dsv4c --context 256 --batch 1 --mtp 0 --steps 10 --profile 2>&1 | tail -22
  stamp inductor;   timeout 100 dsv4c bench $work/mini.dsv4c --batch 1,64 --mtp 0 --baselines inductor \
                      --json $out/step_mini_inductor.json 2>&1 | grep -vE "^\s*$" | tail -12
  stamp engine-host; timeout 60 python3 bench/engine_host_bench.py --batch 1 8 64 --mtp 0 1 3 2>&1 | tail -9
  stamp done; exit 0
fi
if [ "${2:-}" = "--slice" ]; then  # one call of at most ${3:-585} s: flash-slice (34B parameters, an 18.6 GiB checkpoint)
  # written on the GPU, compiled (fused MoE), the checkpoint deleted (disk: 64 GB), its whole step timed by dsv4c
  # alone at batch 1-64 and MTP 0-3; the profile; then, in the time left, against the eager reference at batch 1, 64
  # (bf16 weights: 68 GB). --slice-baselines (same warm machine): the eager reference at 1 and 64, and Inductor.
  df -h /tmp | tail -1
  # the GPU checks (graph replay against the graph-free executor; the writer's bytes on the GPU against the CPU's)
  # run beside the checkpoint's writing and its compile
  (timeout 240 python3 bench/step_graph_bench.py --batch 1 8 > $work/step_graph.txt 2>&1
   timeout 90 python3 bench/synthetic_gpu_check.py > $work/synthetic.txt 2>&1
   (cd bench && timeout 60 python3 act_rounding_gpu_check.py > $work/act_rounding.txt 2>&1)
   (cd bench && timeout 60 python3 kv_pack_gpu_check.py >> $work/act_rounding.txt 2>&1)
   (cd bench && timeout 60 python3 hadamard_rounding_gpu_check.py >> $work/act_rounding.txt 2>&1)
   (cd bench && timeout 90 python3 fp8_grouped_gemm_gpu_check.py >> $work/act_rounding.txt 2>&1)) &
  stamp init;     timeout 170 dsv4c init-checkpoint --preset flash-slice --device cuda --overwrite $work/fs \
                    > $work/init_slice.txt 2>&1; tail -2 $work/init_slice.txt
  # capacity: the context, then 33 timed rounds of up to 1 + 3 tokens
  stamp compile;  timeout 170 dsv4c compile $work/fs -o $work/slice.dsv4c --target h100 --max-seq-len 4352 --jobs 16 \
                    --overwrite > $work/compile_slice.txt 2>&1; tail -2 $work/compile_slice.txt
  du -sh $work/fs $work/slice.dsv4c; rm -rf $work/fs
  wait  # the checks share the GPU: they end before anything is timed
  stamp bench;    timeout $(left) dsv4c bench $work/slice.dsv4c --batch 1,8,32,64 --mtp 0,1,2,3 --baselines "" \
                    --json $out/step_slice.json 2>&1 | grep -vE "^\s*$" | tail -24
  [ "$(left)" -gt 30 ] && slice_profile
  [ "$(left)" -gt 120 ] && slice_eager 1,64
  wait; tail -8 $work/step_graph.txt; grep -E "CHECK|GB" $work/synthetic.txt; cat $work/act_rounding.txt
  stamp done; exit 0
fi
if [ "${2:-}" = "--slice-baselines" ]; then  # right after --slice, on the same warm machine (its artifact): what
  # the eager reference at batch 1 and 64 (its own call: loading, dequantising and prefilling it take minutes), then
  # Inductor of the reference in the time left
  [ -d $work/slice.dsv4c ] || { echo "no flash-slice artifact on this machine: run --slice first"; exit 1; }
  [ -f $work/step_slice_eager_1_64.done ] || deadline=400 slice_eager 1,64  # the rest of the call for Inductor
  # Inductor without autotuning first (minutes to compile at Flash size, CUDA graphs), then max-autotune in the
  # time left: a run writes its JSON at its end, so the first is kept whatever the second's autotuning takes
  for mode in reduce-overhead max-autotune; do
    stamp "inductor $mode"; timeout $(( $(left) > 90 ? $(left) - 30 : 30 )) dsv4c bench $work/slice.dsv4c \
      --batch 1,64 --mtp 0 --baselines inductor --inductor-mode $mode --json $out/step_slice_inductor_$mode.json \
      2>&1 | grep -vE "^\s*$" | tail -10
  done
  stamp done; exit 0
fi
if [ "${2:-}" = "--slice-unfused" ]; then  # last, on the same warm machine or a fresh one: flash-slice's step before
  # the MoE lowering (`--moe unfused`: routed_moe and the shared expert's FP8 GEMMs) at batch 1 and 64; the fused
  # artifact is deleted first (disk: 64 GB)
  rm -rf $work/slice.dsv4c
  stamp init;     timeout 170 dsv4c init-checkpoint --preset flash-slice --device cuda --overwrite $work/fs \
                    > $work/init_slice.txt 2>&1; tail -1 $work/init_slice.txt
  stamp compile;  timeout 200 dsv4c compile $work/fs -o $work/unfused.dsv4c --target h100 --max-seq-len 4224 \
                    --moe unfused --jobs 16 --overwrite > $work/compile_unfused.txt 2>&1; tail -2 $work/compile_unfused.txt
  rm -rf $work/fs
  stamp bench;    timeout $(left) dsv4c bench $work/unfused.dsv4c --batch 1,64 --mtp 0 --baselines "" \
                    --json $out/step_slice_unfused.json 2>&1 | grep -vE "^\s*$" | tail -8
  stamp done; exit 0
fi
if [ "${2:-}" = "--tune" ]; then  # one call of about 300 s: the fused MoE over a grid of launches at T = 1, 8, 64
  stamp moe-sweep; timeout 400 python3 bench/moe_bench.py --t 1 8 64 --no-compile --launches --sweep --json "$out/moe_sweep.json" \
                     2>&1 | grep -vE "^\{" | tail -30
  stamp done; exit 0
fi
if [ "${2:-}" = "--long" ]; then  # one call of about 500 s: flash-slice's step at context 4K against 64K (one
  # artifact of 64K positions, prefilled in chunks of 256; dsv4c alone: --slice-baselines times the references at
  # 4K), then the compressor. Disk (64 GB): the checkpoint and this artifact take 38 GB, --slice's goes first
  rm -rf $work/slice.dsv4c $work/unfused.dsv4c
  stamp init;     timeout 170 dsv4c init-checkpoint --preset flash-slice --device cuda --overwrite $work/fs \
                    > $work/init_slice.txt 2>&1; tail -1 $work/init_slice.txt
  stamp compile;  timeout 200 dsv4c compile $work/fs -o $work/long.dsv4c --target h100 --max-seq-len 65664 \
                    --prefill-chunk 256 --jobs 16 --overwrite > $work/compile_long.txt 2>&1; tail -2 $work/compile_long.txt
  rm -rf $work/fs
  for context in 4096 65536; do
    stamp "context $context"; timeout $(( $(left) - 60 )) dsv4c bench $work/long.dsv4c --context $context \
      --batch 1,32 --mtp 0 --baselines "" --json $out/step_long_$context.json 2>&1 | grep -vE "^\s*$" | tail -12
  done
  stamp compressor; (cd bench && timeout $(left) python3 compressor_bench.py --json $out/compressor.json 2>&1 | tail -20)
  stamp done; exit 0
fi
if [ "${2:-}" = "--quick" ]; then  # one call: flash-mini and the demo model written and compiled (CPU, one process a
  # variant) while the foreground runs the FP8 check; then, serially on the GPU: flash-mini's step, the demo model
  # at MTP 0..3 and its batch invariance, the fused MoE and attention benches with their Inductor baselines,
  # Inductor of flash-mini, the indexer to 256K
  setsid nohup bash -c '
    work='"$work"'; t0=$(date +%s); stamp() { echo "== $(( $(date +%s) - t0 ))s $*"; }
    step() { local name=$1; shift; stamp "$name"; "$@" > $work/$name.txt 2>&1 || stamp "$name FAILED"; }
    (step compile_demo dsv4c compile model/demo_model -o $work/demo.dsv4c --target h100 --max-seq-len 1024 --overwrite) &
    step init_mini dsv4c init-checkpoint --preset flash-mini --device cuda --overwrite $work/fm
    step compile_mini dsv4c compile $work/fm -o $work/mini.dsv4c --target h100 --max-seq-len 4224 --explain --overwrite
    wait
    while [ ! -f $work/kernels.done ]; do sleep 2; done
    step bench_mini dsv4c bench $work/mini.dsv4c --batch 1,8,64 --mtp 0,1 --baselines eager --json $work/step_mini.json
    step bench_demo dsv4c bench $work/demo.dsv4c --context 512 --batch 1,8 --mtp 0,1,2,3 --baselines eager --json $work/demo.json
    step invariance timeout 120 python3 bench/batch_invariance_check.py --artifact $work/demo.dsv4c
    step moe timeout 150 python3 bench/moe_bench.py --t 1 8 32 64 128 --json $work/moe.json
    step attention bash -c "cd bench && timeout 120 python3 attention_bench.py --contexts 4096 65536 262144 --batches 1 32 --json $work/attention.json"
    step bench_mini_inductor dsv4c bench $work/mini.dsv4c --batch 1,64 --mtp 0 --baselines inductor --json $work/step_mini_inductor.json
    step profile_mini dsv4c bench $work/mini.dsv4c --context 256 --batch 1 --mtp 0 --steps 10 --profile
    step indexer bash -c "cd bench && timeout 120 python3 indexer_bench.py --contexts 4096 65536 262144 --batches 1 32 --json $work/indexer.json"
    stamp done; touch $work/pipeline.done
  ' > "$work/pipeline.log" 2>&1 < /dev/null &
  stamp fp8-check;  timeout 35 python3 bench/fp8_gemm_gpu_check.py 2>&1 | grep -E "PASS|FAIL|Error" | head -12
  touch "$work/kernels.done"
  stamp pipeline;   collect "${3:-570}"; exit 0
fi
setsid nohup bash -c '
  work='"$work"'; t0=$(date +%s); stamp() { echo "== $(( $(date +%s) - t0 ))s $*"; }
  step() { local name=$1; shift; stamp "$name"; "$@" > $work/$name.txt 2>&1 || stamp "$name FAILED"; }
  step init dsv4c init-checkpoint --preset flash-slice --device cuda --overwrite $work/fs
  step compile_fused dsv4c compile $work/fs -o $work/fused.dsv4c --target h100 --max-seq-len 4224 --explain --overwrite
  step compile_demo dsv4c compile model/demo_model -o $work/demo.dsv4c --target h100 --max-seq-len 1024 --overwrite
  step compile_unfused dsv4c compile $work/fs -o $work/unfused.dsv4c --target h100 --max-seq-len 4224 --moe unfused --overwrite
  while [ ! -f $work/kernels.done ]; do sleep 2; done
  step bench_fused dsv4c bench $work/fused.dsv4c --batch 1,8,32,64 --mtp 0,1 --baselines eager,inductor --json $work/step_fused.json --plot $work/step_fused.png
  step bench_demo dsv4c bench $work/demo.dsv4c --context 512 --batch 1,8 --mtp 0,1,2,3 --baselines eager --json $work/demo.json
  [ -f bench/batch_invariance_check.py ] && step invariance timeout 240 python3 bench/batch_invariance_check.py --artifact $work/demo.dsv4c
  step bench_unfused dsv4c bench $work/unfused.dsv4c --batch 1,64 --mtp 0 --json $work/step_unfused.json
  step bench_transformers dsv4c bench $work/fused.dsv4c --batch 1,64 --mtp 0 --baselines transformers --json $work/step_transformers.json
  stamp done; touch $work/pipeline.done
' > "$work/pipeline.log" 2>&1 < /dev/null &

stamp step-graph; timeout 70 python3 bench/step_graph_bench.py --batch 1 8 2>&1 | tail -8
stamp synthetic;  timeout 60 python3 bench/synthetic_gpu_check.py 2>&1 | grep -E "CHECK|GB"
stamp moe-check;  timeout 60 python3 bench/moe_gpu_check.py 2>&1 | grep -E "CHECK|Error" | head -12
stamp mhc-invariant; timeout 45 python3 bench/mhc_bench.py --invariant --tokens 1 8 16 64 128 --json "$out/mhc_invariant.json" 2>&1 | grep -E "PASS|FAIL|COST|Error" | head -20
stamp fp8;        timeout 80 python3 bench/fp8_gemm_bench.py --json "$out/fp8.json" 2>&1 | tail -30
stamp moe;        timeout 150 python3 bench/moe_bench.py --t 1 8 32 64 128 --json "$out/moe.json" 2>&1 | tail -14
stamp attention;  (cd bench && timeout 120 python3 attention_bench.py --contexts 4096 65536 262144 --batches 1 32 --json "$out/attention.json" 2>&1 | tail -16)
stamp indexer;    (cd bench && timeout 120 python3 indexer_bench.py --contexts 4096 65536 262144 --batches 1 32 --json "$out/indexer.json" 2>&1 | tail -18)
touch "$work/kernels.done"
collect "${2:-560}"
