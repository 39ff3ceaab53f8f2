#!/usr/bin/env bash
# Runs every benchmark with its baselines and prints the machine it ran on.
# Results go to stdout and to .bench/latest.txt; BENCHMARKS.md records them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .bench
out=.bench/latest.txt
{
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(git describe --always --dirty 2>/dev/null || echo unknown)"
  echo "# cores: $(nproc), kernel: $(uname -r), cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  go test -count=1 -run '^$' -bench . -benchtime 1x -timeout 30m -v ./bench/ 2>&1
} | tee "$out"
