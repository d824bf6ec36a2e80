#!/bin/bash
# Old vs new bench binaries, alternating, same machine. Old: a clone of 6e34b03 (before
# #16/#17) in /tmp/fresh/main built by its scripts/build; new: this checkout's build/.
set -e
out=/work/main/bench/results/cpu-2026-12-01/regress
mkdir -p $out
for round in 1 2; do
  for v in old new; do
    if [ $v = old ]; then b=/tmp/fresh/main/build/bench; else b=/work/main/build/bench; fi
    $b/bench_logprobs "--benchmark_filter=tokens:2048/V:32000" --benchmark_out=$out/logprobs_${v}_$round.json --benchmark_out_format=json > /dev/null 2>&1
    $b/bench_losses --benchmark_out=$out/losses_${v}_$round.json --benchmark_out_format=json > /dev/null 2>&1
    $b/bench_fused "--benchmark_filter=H:512/V:32000" --benchmark_out=$out/fused_${v}_$round.json --benchmark_out_format=json > /dev/null 2>&1
  done
done
echo finished > $out/done.txt
