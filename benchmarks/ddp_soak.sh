#!/usr/bin/env bash
# Run tests/test_ddp.py N times in a row (default 20) while two busy loops keep both cores loaded;
# prints one line per run and the count. The check of issue 12 for the DDP teardown crash.
#   bash benchmarks/ddp_soak.sh 20
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
out=$(mktemp -d)
python3 -c "while True: pass" & burner1=$!
python3 -c "while True: pass" & burner2=$!
trap 'kill $burner1 $burner2 2>/dev/null' EXIT
passed=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  if .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_ddp.py > "$out/run$i.log" 2>&1; then
    passed=$((passed + 1)); result=ok
  else
    result="FAILED (log: $out/run$i.log)"
  fi
  echo "run $i: $result, $(( $(date +%s) - start )) s, $(tail -1 "$out/run$i.log")"
done
echo "passed $passed of $runs"
[ "$passed" -eq "$runs" ]
