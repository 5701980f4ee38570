#!/usr/bin/env bash
# Every GPU measurement the open issues need, in one device call (docs: BENCHMARKS.md, bench/*.py).
#
#   bash bench/gpu_session.sh OUT [SECONDS]
#
# Starts the flash-slice pipeline detached (setsid: it outlives this call while the machine stays held):
# write the checkpoint on the GPU, compile it with the fused MoE and bench it, then with `--moe unfused`,
# then the baselines; meanwhile runs the kernel benchmarks in the foreground (the fused MoE, the FP8 GEMM,
# sparse attention, the CUDA-graph step check, the synthetic writer's check, the demo model at MTP 0..3).
# Waits up to SECONDS (default 540) for the pipeline, then copies what exists into OUT; a later `bash bench/gpu_session.sh OUT --collect
# SECONDS` on the same warm machine waits again and collects. Logs: /tmp/dsv4c-gpu/*.txt.
set -u
out=$(realpath -m "${1:?usage: gpu_session.sh OUT [SECONDS | --collect SECONDS]}")
work=/tmp/dsv4c-gpu
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 COLUMNS=200
t0=$(date +%s); stamp() { echo "== $(( $(date +%s) - t0 ))s $*"; }

collect() {
  local limit=$1
  while [ ! -f "$work/pipeline.done" ] && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do sleep 2; done
  cat "$work/pipeline.log"
  for f in step_fused.json step_fused.png step_unfused.json step_baselines.json; do
    [ -f "$work/$f" ] && cp "$work/$f" "$out/"
  done
  cat "$work"/bench_*.txt > "$out/bench_all.txt" 2>/dev/null
}

if [ "${2:-}" = "--collect" ]; then collect "${3:-540}"; exit 0; fi

python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . 2>&1 | tail -2
if ! command -v dsv4c >/dev/null; then  # the console script's folder may not be on PATH there
  dsv4c() { python3 -c "import sys; from dsv4c.compiler.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
  export -f dsv4c
fi
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda, torch.cuda.get_device_name())"
rm -f "$work/pipeline.done"
setsid nohup bash -c '
  work='"$work"'; t0=$(date +%s); stamp() { echo "== $(( $(date +%s) - t0 ))s $*"; }
  stamp write; dsv4c init-checkpoint --preset flash-slice --device cuda --overwrite $work/fs > $work/init.txt 2>&1 || { stamp write FAILED; touch $work/pipeline.done; exit 1; }
  for moe in default unfused; do
    flag=; [ $moe = unfused ] && flag="--moe unfused"
    stamp compile $moe; rm -rf $work/fs.dsv4c
    dsv4c compile $work/fs -o $work/fs.dsv4c --target h100 --max-seq-len 4224 $flag --explain > $work/compile_$moe.txt 2>&1 || { stamp compile $moe FAILED; continue; }
    while [ ! -f $work/kernels.done ]; do sleep 2; done
    stamp bench $moe
    name=$([ $moe = default ] && echo fused || echo unfused)
    dsv4c bench $work/fs.dsv4c --batch 1,8,32,64 --mtp 0,1 --baselines eager --json $work/step_$name.json --plot $work/step_$name.png > $work/bench_$name.txt 2>&1 || stamp bench $moe FAILED
  done
  stamp baselines
  dsv4c bench $work/fs.dsv4c --batch 1,64 --mtp 0 --baselines eager,transformers,inductor --json $work/step_baselines.json > $work/bench_baselines.txt 2>&1 || stamp baselines FAILED
  stamp done; touch $work/pipeline.done
' > "$work/pipeline.log" 2>&1 < /dev/null &

rm -f "$work/kernels.done"
stamp moe;        timeout 100 python3 bench/moe_bench.py --t 1 8 32 64 128 --json "$out/moe.json" 2>&1 | tail -8
stamp fp8;        timeout 80 python3 bench/fp8_gemm_bench.py --json "$out/fp8.json" 2>&1 | tail -30
stamp attention;  (cd bench && timeout 100 python3 attention_bench.py --contexts 4096 65536 262144 --batches 1 32 --json "$out/attention.json" 2>&1 | tail -12)
stamp step-graph; timeout 80 python3 bench/step_graph_bench.py --batch 1 8 2>&1 | tail -8
stamp synthetic;  timeout 70 python3 bench/synthetic_gpu_check.py 2>&1 | grep -E "CHECK|GB"
stamp demo;       timeout 140 bash -c "dsv4c compile model/demo_model -o $work/demo.dsv4c --target h100 --max-seq-len 1024 \
  --overwrite > $work/compile_demo.txt 2>&1 && dsv4c bench $work/demo.dsv4c --context 512 --batch 1,8 --mtp 0,1,2,3 \
  --baselines eager --json $out/demo.json" 2>&1 | tail -14
touch "$work/kernels.done"
collect "${2:-540}"
