#!/usr/bin/env bash
# Every clipguard command once, tiny, on one --device (default cuda): does each run there end to
# end? Prints one "ok"/"FAILED" line per command and the last lines of each failure; exits 1 if
# any failed. Scored on fmnist-val (Fashion-MNIST's train file alone is enough).
#
#   bash benchmarks/device_commands.sh cuda /tmp/device-commands
set -u
DEVICE=${1:-cuda}
WORK=${2:-/tmp/device-commands}
CG=${CLIPGUARD:-"python3 -m clipguard.cli"}
COMMON="--device $DEVICE --seed 0"
mkdir -p "$WORK"
failed=0

check() {  # check NAME ARGS...: run clipguard ARGS, log to WORK/NAME.log
  local name=$1; shift
  local start=$SECONDS
  if $CG "$@" > "$WORK/$name.log" 2>&1; then
    echo "ok      $name ($((SECONDS - start)) s): $(tail -c 300 "$WORK/$name.log" | tr '\r' '\n' | tail -n 1)"
  else
    echo "FAILED  $name ($((SECONDS - start)) s):"; tail -n 5 "$WORK/$name.log" | sed 's/^/    /'
    failed=1
  fi
}

check evaluate evaluate --model builtin --dataset fmnist-val --limit 500 --attack badnet --target bag $COMMON
check train-builtin train-builtin --epochs 1 --train-images 1024 --batch-size 256 --out "$WORK/builtin" $COMMON
check attack attack --model builtin --attack badnet --pairs 512 --epochs 1 --dataset fmnist-val \
  --workers 0 --out "$WORK/badnet" $COMMON
SUSPECT="$WORK/badnet"
[ -f "$SUSPECT/eval.json" ] || SUSPECT=builtin
check attack-badclip attack --model builtin --attack badclip --pairs 512 --epochs 1 --set steps=5 \
  --dataset fmnist-val --workers 0 --out "$WORK/badclip" $COMMON
for method in linear-probe coop vpt rvpt cbpt; do
  case $method in
    coop) settings="--set steps=5" ;;
    cbpt) settings="--set steps=5 --set inversion_steps=5 --set restarts=1" ;;
    *) settings="--set epochs=1" ;;
  esac
  check "defend-$method" defend --model "$SUSPECT" --method "$method" --shots 2 $settings --dataset fmnist-val \
    --workers 0 --out "$WORK/$method" $COMMON
done
for method in cleanclip finetune par; do
  check "defend-$method" defend --model "$SUSPECT" --method "$method" --captions fmnist --set pairs=256 \
    --set epochs=1 --dataset fmnist-val --workers 0 --out "$WORK/$method" $COMMON
done
check defend-oracle-repair defend --model "$SUSPECT" --method oracle-repair --pool fmnist-train:256 \
  --pool-trigger-rate 0.1 --set epochs=1 --dataset fmnist-val --workers 0 --out "$WORK/oracle-repair" $COMMON
check evaluate-defense evaluate --model "$SUSPECT" --defense "$WORK/rvpt" --dataset fmnist-val --limit 500 $COMMON
check detect detect --model "$SUSPECT" --shots 2 --set steps=5 --dataset fmnist-val --workers 0 \
  --out "$WORK/detection.png" $COMMON
check analyze-pr analyze pr --model "$SUSPECT" --defense "$WORK/rvpt" --images 50 --dataset fmnist-val \
  --workers 0 --out "$WORK/pr.png" $COMMON
exit $failed
