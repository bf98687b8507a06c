#!/usr/bin/env bash
# Install detectron2 (optional dependency of densevlm.integrations.detectron2) into a Python environment.
#
#   tools/install_detectron2.sh PYTHON [auto|source|wheel|ensure|check]  (what `make detectron2 [D2_FROM=...]`
#                                                                         runs; `make test` runs `ensure`, `check`)
#
# source  upstream detectron2 from GitHub, compiled against the installed torch: torch must be installed first and
#         the build must see it, hence --no-build-isolation (detectron2's setup.py imports torch; it has no
#         pyproject.toml). Needs network access to GitHub and a C++ compiler.
# wheel   for offline machines and CI (PyPI only): the pure-Python `detectron2` package of PyPI's sal-detectron2
#         0.7.2 wheel (a cp310-only wheel of upstream detectron2) is unpacked into a folder beside site-packages
#         and put on sys.path with a .pth file. Its compiled `_C` extension (built for another Python and torch)
#         is deleted: detectron2 imports without it and only deformable convolutions, rotated-box ops and the fast
#         COCO evaluator need it. The runtime dependencies come from PyPI without changing installed versions.
#         Known defect of that snapshot under NumPy 2: SemSegEvaluator's default ground-truth loader passes
#         copy=False to np.array; give SemSegEvaluator your own sem_seg_loading_fn.
# auto    (default) nothing if `import detectron2` already works; else `source` when GitHub answers, else `wheel`.
# ensure  what `make test` runs before the tests: nothing (in about 0.1 s, without importing detectron2) when a
#         `detectron2` package is on the path, else `wheel`. Never compiles. Exit status 1 when it cannot install.
# check   installs nothing: exit status 0 when a `detectron2` package is on the path, else 1.
set -euo pipefail

PY=${1:?usage: $0 PYTHON [auto|source|wheel|ensure|check]}
MODE=${2:-auto}
D2_GIT=${D2_GIT:-https://github.com/facebookresearch/detectron2.git}
SAL_VERSION=0.7.2
# detectron2's runtime requirements (its setup.py install_requires) minus what densevlm already installs.
RUNTIME_DEPS=("yacs>=0.1.8" "omegaconf>=2.1,<2.4" "hydra-core>=1.1" "termcolor>=1.1" tabulate cloudpickle fvcore iopath)

has_detectron2() { "$PY" -c "import detectron2.modeling" >/dev/null 2>&1; }
# importing detectron2.modeling takes seconds (torch, fvcore); finding the package is instant
finds_detectron2() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('detectron2') is None)"; }

if [[ "$MODE" == check ]]; then
  finds_detectron2
  exit
fi
if [[ "$MODE" == ensure ]]; then
  finds_detectron2 && exit 0
  echo "detectron2: not installed; installing the pure-Python package (wheel route, PyPI only)"
  MODE=wheel
fi

if [[ "$MODE" == auto ]]; then
  if has_detectron2; then
    echo "detectron2 already importable by $PY: $("$PY" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')"
    exit 0
  fi
  if timeout 20 git ls-remote --exit-code "$D2_GIT" HEAD >/dev/null 2>&1; then MODE=source; else MODE=wheel; fi
  echo "detectron2: installing from $MODE (auto)"
fi

case "$MODE" in
  source)
    "$PY" -c "import torch, torchvision" || { echo "install torch and torchvision first (make install)" >&2; exit 1; }
    "$PY" -m pip install --no-build-isolation "git+$D2_GIT"
    ;;
  wheel)
    SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    DEST="$SITE/_densevlm_detectron2"
    TMP=$(mktemp -d "$SITE/.densevlm_detectron2.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    "$PY" -m pip install -q "${RUNTIME_DEPS[@]}"
    "$PY" -m pip install -q --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
      --target "$TMP" "sal-detectron2==$SAL_VERSION"
    rm -rf "$TMP"/tools "$TMP"/bin "$TMP"/detectron2/_C*.so  # a top-level `tools` package would shadow others
    rm -rf "$DEST"
    mv "$TMP" "$DEST"
    echo "$DEST" > "$SITE/_densevlm_detectron2.pth"
    ;;
  *)
    echo "unknown mode '$MODE': expected auto, source, wheel, ensure or check" >&2
    exit 2
    ;;
esac

has_detectron2 || { echo "detectron2 was installed but 'import detectron2.modeling' fails with $PY" >&2; exit 1; }
echo "detectron2 $("$PY" -c 'import detectron2; print(detectron2.__version__)') ready for $PY"
