# Sourced by the GPU check scripts after they set $out: the environment, and with WHEELS=dir the
# wheels/sdists found there installed first (a machine without network).
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/llm_torch_extensions}"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
  DS_BUILD_OPS=0 python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --no-compile \
    --target /tmp/site "$WHEELS"/deepspeed-*.tar.gz > "$out/deepspeed_install.log" 2>&1 || { tail -20 "$out/deepspeed_install.log"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# the built-in corpus (ignored by git, so not carried to a fresh machine): made once, in seconds
if [ ! -f data/builtin/builtin_text_document.idx ]; then
  python3 scripts/preprocess_data.py --builtin-corpus --tokenizer tokenizer/llm_sp8k.model \
    --output-prefix data/builtin/builtin_text_document --workers 8 --no-progress > "$out/builtin_data.log" 2>&1 \
    || { tail -5 "$out/builtin_data.log"; exit 1; }
fi

steady_steps() {  # run directory, first iteration counted [, iterations left out] -> medians of the steps
  python3 - "$@" <<'PY'
import json, statistics, sys
d, first, left_out = sys.argv[1], int(sys.argv[2]), {int(i) for i in sys.argv[3:]}
try:
    rs = [json.loads(l) for l in open(f"{d}/metrics.jsonl") if l.strip()]
except OSError as e:
    sys.exit(f"no metrics: {e}")
steps = [r for r in rs if "tokens_per_sec" in r and r["iteration"] >= first and r["iteration"] not in left_out]
def med(k):
    values = [r[k] for r in steps if r.get(k) is not None]
    return statistics.median(values) if values else None
if steps:
    print({"tokens_per_sec": med("tokens_per_sec"), "mfu": med("mfu"), "tflops_per_gpu": med("tflops_per_gpu"),
           "step_time": med("step_time"), "peak_memory_gb": max((r.get("peak_memory_gb") or 0) for r in steps),
           "last_loss": steps[-1].get("loss")})
PY
}

compare_losses() {  # label run_a run_b -> the largest absolute and relative loss difference where both logged
  python3 - "$@" <<'PY'
import json, sys
label, a, b = sys.argv[1:4]
def losses(d):
    try:
        return {r["iteration"]: r["loss"] for r in map(json.loads, open(f"{d}/metrics.jsonl")) if "loss" in r}
    except OSError as e:
        sys.exit(f"{label}: no metrics: {e}")
la, lb = losses(a), losses(b)
common = sorted(set(la) & set(lb))
if common:
    print(f"{label}: iterations {common[0]}-{common[-1]}, max |loss difference| {max(abs(la[i] - lb[i]) for i in common):.6g}, "
          f"max relative {max(abs(la[i] - lb[i]) / abs(la[i]) for i in common):.6g}, identical: {all(la[i] == lb[i] for i in common)}")
PY
}
