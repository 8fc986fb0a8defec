#!/usr/bin/env bash
# Checks the oldest stack pyproject.toml declares: builds a virtual environment with the oldest
# Python of requires-python and each dependency at its declared minimum, mmpretrain at the `mm`
# extra's minimum (with the torchvision of that torch), and the `tests` extra; installs mmorepa
# from this tree with its C++ extension, and runs the tests that build no mmdet / mmseg model.
# mmcv comes as mmcv-lite at mmcv's minimum: mmorepa and mmpretrain import only mmcv's pure-Python
# part, and mmcv's compiled ops (which mmdet and mmseg need) come from a source build of their own.
# The environment lives in $MMOREPA_CACHE/oldest-stack (default ~/.cache/mmorepa), outside the
# repository; a second run reuses it.
#
#   bash tools/check_oldest_stack.sh [pytest args]   # about 3 GB of downloads the first time
#
# OLDEST_PYTHON names the interpreter where `pythonX.Y` (requires-python's minimum) is not on PATH.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MMOREPA_CACHE:-$HOME/.cache/mmorepa}"
VENV="$CACHE/oldest-stack"
PY="$VENV/bin/python"
# the tests that build no mmdet / mmseg model (test_packaging reads metadata with Python >= 3.10;
# test_tools' demo trains a detector and a segmentor)
TESTS=(tests/test_algebra.py tests/test_squeeze.py tests/test_squeeze_one_channel.py
    tests/test_install.py tests/test_layers.py tests/test_routes.py tests/test_eval_cache.py
    tests/test_compile.py tests/test_amp.py tests/test_checkpoint.py tests/test_official_import.py
    tests/test_deploy_configs.py tests/test_quantize.py tests/test_export.py tests/test_analysis.py
    tests/test_tool_errors.py tests/test_tool_outputs.py)
NOT_MMDET_MMSEG='not (faster_rcnn or retinanet or pspnet or deeplabv3plus)'

log() { printf '[oldest-stack] %s\n' "$*" >&2; }

# From pyproject.toml: "python3.9" and "torch==2.4 torchvision==0.19 mmengine==0.10.0
# mmcv-lite==2.0.0 numpy opencv-python mmpretrain==1.2.0 pytest ..."
read -r PYTHON PINS < <(python3 - "$ROOT/pyproject.toml" <<'PYEOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], 'rb'))['project']
python = 'python' + re.search(r'>=\s*([\d.]+)', project['requires-python']).group(1)
mmpretrain = [r for r in project['optional-dependencies']['mm'] if r.startswith('mmpretrain')]
pins = []
for req in project['dependencies'] + mmpretrain:
    name, low = re.match(r'([A-Za-z0-9_.-]+)(?:[^;]*?>=\s*([\w.]+))?', req).groups()
    name = 'mmcv-lite' if name == 'mmcv' else name
    pins.append(f'{name}=={low}' if low else name)
    if name == 'torch':  # torchvision 0.(m + 15) goes with torch 2.m
        pins.append('torchvision==0.%d' % (int(low.split('.')[1]) + 15))
print(python, ' '.join(pins + project['optional-dependencies']['tests']))
PYEOF
)
PYTHON="${OLDEST_PYTHON:-$PYTHON}"
log "python: $PYTHON; stack: $PINS"

if [[ ! -x "$PY" ]]; then
    "$PYTHON" -c '' 2>/dev/null ||
        { log "$PYTHON does not run (the oldest Python declared): set OLDEST_PYTHON"; exit 1; }
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$PY" -m pip install --disable-pip-version-check --no-input -q)
"${PIP[@]}" --upgrade pip
# shellcheck disable=SC2086  # PINS is a list of requirement specifiers
"${PIP[@]}" $PINS -r "$ROOT/requirements/build.txt"  # setuptools with pkg_resources: mmengine's configs

# a copy of the tree (tracked and new files), so the build leaves nothing in the repository
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
    tar --null -T - -cf -) | tar -xf - -C "$work/src"
log "installing mmorepa with its extension (compiles against torch $("$PY" -c 'import torch; print(torch.__version__)'))"
MMOREPA_BUILD_EXT=1 "${PIP[@]}" --no-deps --no-build-isolation --force-reinstall "$work/src"

"$PY" -m pip list --disable-pip-version-check 2>/dev/null |
    grep -iE '^(torch|mmengine|mmcv-lite|numpy|opencv-python|mmorepa) ' >&2
# the installed mmorepa, with its extension loaded (pytest's script, unlike `python -m pytest`,
# puts no source tree on sys.path)
(cd "$work" && "$PY" -c 'import mmorepa, mmorepa.ops.extension as e
assert "site-packages" in mmorepa.__file__, mmorepa.__file__
assert e.squeeze_cpu is not None, e.unavailable_reason()')
cd "$ROOT"  # the tests name configs/ and tools/ relative to it
"$VENV/bin/pytest" -q -p no:cacheprovider -k "$NOT_MMDET_MMSEG" "${TESTS[@]}" "$@"
