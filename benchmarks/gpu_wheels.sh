#!/usr/bin/env bash
# What the device machine's image lacks, as files to carry there (it has no network): DeepSpeed's
# source distribution and the pure-Python packages it needs, for that machine's Python 3.12 on x86-64
# (torch, transformers, sentencepiece, xxhash, numpy, pyyaml and the rest are in its image; wandb and
# datasets are imported only where a run asks for them). About 5 MB. benchmarks/gpu_env.sh installs
# them there when WHEELS names the folder.
#
#   bash benchmarks/gpu_wheels.sh [DIR]        (default .whl, ignored by git; run it here, with network)
set -euo pipefail
dir="${1:-.whl}"
mkdir -p "$dir"
python3 -m pip download -q --no-deps --no-binary=:all: -d "$dir" deepspeed==0.19.8
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
ls -la "$dir"
