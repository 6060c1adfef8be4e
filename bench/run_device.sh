#!/usr/bin/env bash
# Every GPU benchmark of issue 4 in one call on the lent device machine; each stage's JSON and log go under $OUT.
#
#   .venv/bin/python bench/prepare_device.py                 # here, once: fills .device/ (git-ignored)
#   bash bench/run_device.sh [docs] [queries] [padded] [e2e]  # there, through the device tool, carry [".device"]
#
# With no stage named it runs all four (about 10 minutes on an H100; name fewer to fit a shorter limit). That
# machine has torch, transformers, sentence-transformers and pyarrow; the wheels in .device/whl add reembed's
# pure-Python needs. A failing stage is reported and the next one still runs. PYTHON, DEVICE and LIMIT
# (environment) override python3, cuda and each benchmark's default size, e.g. for a CPU smoke run.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
if [ ! -d .device/whl ]; then
    echo ".device/ is missing: run bench/prepare_device.py here and carry .device" >&2
    exit 2
fi
py=${PYTHON:-python3}
if ! "$py" -c "import pydantic, tenacity, qdrant_client" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --target /tmp/reembed-site .device/whl/*.whl || exit 2
    export PYTHONPATH=/tmp/reembed-site
fi
data=(--device "${DEVICE:-cuda}" --minilm .device/minilm --scifact .device/scifact ${LIMIT:+--limit "$LIMIT"})
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$py" -c "import torch, transformers, sentence_transformers as st; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'sentence-transformers', st.__version__)"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

failed=0
stage() {
    local name=$1
    shift
    echo "== $name: $py $* --json"
    "$py" "$@" --json > "$out/$name.json" 2> "$out/$name.log"
    local rc=$?
    grep -v -e Warning -e warn -e "it/s]" -e "^  " "$out/$name.log" | tail -n 6
    [ "$rc" -eq 0 ] || { echo "!! $name failed (exit $rc): see $out/$name.log"; failed=1; }
}
for name in "${@:-docs queries padded e2e}"; do
    for s in $name; do
        case $s in
            docs) stage docs bench/encode.py "${data[@]}" --models minilm,bert-base,bert-large --corpus docs ;;
            queries) stage queries bench/encode.py "${data[@]}" --models minilm,bert-base,bert-large --corpus queries ;;
            padded) stage padded bench/encode.py "${data[@]}" --models bert-base --attention padded ;;
            e2e) stage e2e bench/e2e.py "${data[@]}" ;;
            *) echo "unknown stage $s (docs, queries, padded, e2e)" >&2; exit 2 ;;
        esac
    done
done
exit $failed
