#!/usr/bin/env bash
# The whole 3B DAG on the GPU profile, as one lent GPU machine runs it (docs/benchmarks.md).
#
#   bash benchmarks/gpu_whole_dag.sh start  DEADLINE_S    # a fresh run, cut short at DEADLINE_S
#   bash benchmarks/gpu_whole_dag.sh resume DEADLINE_S    # the same machine: go on where it stopped
#
# Why a script: the machine starts bare (no registry, no git, its own torch and transformers) and
# its time is counted. The packages this project pins and the image lacks travel as wheels in
# .whl/ (`bash benchmarks/gpu_wheels.sh` here); the image's torch (CUDA build) stays. benchmarks/whole_dag.py
# runs every stage under `dvc repro --single-item` (DVC without git where the image has none),
# writes its result after each stage and kills the running stage at the deadline; `resume` goes
# on from there in the same work folder. The result and the stages' logs land in $OUT.
# Captions: the repo's 20-image sample holds 8 + 6 + 6 (the profile asks COCO for 32 + 8 + 8),
# so eight confidence batches of one sample, as the 3B CPU run.
set -uo pipefail
MODE=${1:?start or resume}
DEADLINE=${2:?seconds}
WORK=/tmp/dag3b-gpu
RESULT=/tmp/whole_dag_3b_gpu.json
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

if [ "$MODE" = start ]; then
    rm -rf "$WORK" "$RESULT"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 OP_SENSITIVITY_COMMIT="$(cat .whl/commit 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, numpy, dvc, neural_compressor; print('torch', torch.__version__,
'transformers', transformers.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())" || exit 1

args=(--profile profiles/3b-gpu.yaml --workdir "$WORK" --out "$RESULT" --deadline "$DEADLINE"
      -S model.source=full_size_random -S model.input=data/calibration
      -S captions.count=8 -S captions.selection_count=6 -S captions.test_count=6 -S sensitivity.batch_size=1)
[ "$MODE" = resume ] && args+=(--resume)
python3 benchmarks/whole_dag.py "${args[@]}"
rc=$?
cp "$RESULT" "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$WORK" logs reports/runtime 2>/dev/null
nvidia-smi --query-gpu=memory.used --format=csv,noheader
exit $rc
