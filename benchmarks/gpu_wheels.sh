#!/usr/bin/env bash
# The wheels benchmarks/gpu_whole_dag.sh installs on a GPU machine that reaches no registry:
# requirements.lock's pins that its image lacks (benchmarks/gpu_wheels.txt: the lock less the
# image's packages - its CUDA torch, numpy, pandas, ... stay - and less the dev tools; pulp because ModelOpt's quantization module imports it; transformers
# because the image's is older than the lock's), for CPython 3.12 on x86-64,
# into .whl/ (git ignores it), and the commit they go with in .whl/commit.
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
mkdir -p .whl
platforms=()
for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${p}_x86_64")
done
while read -r pin; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$pin" 2>/dev/null \
        || python3 -m pip wheel -q --no-deps -w .whl "$pin"   # an sdist only (antlr4 4.9.3): pure Python
done < benchmarks/gpu_wheels.txt
git rev-parse HEAD > .whl/commit
du -sh .whl
