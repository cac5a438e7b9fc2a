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
