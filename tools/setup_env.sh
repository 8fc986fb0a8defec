#!/usr/bin/env bash
# Creates .venv/ at the repository root with the pinned OpenMMLab stack and mmorepa (editable, with
# its C++ extension mmorepa._squeeze_cpu compiled in place: MMOREPA_BUILD_EXT=1).
#
# Idempotent: on a ready machine it checks a stamp and returns in seconds. mmcv 2.1.0 has no wheel for
# torch 2.14, so it is built from its sdist (C++20 patch, see ../shared/ENVIRONMENT.md) once per machine and
# the wheel kept in $MMOREPA_CACHE (default ~/.cache/mmorepa), outside the repository.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
CACHE="${MMOREPA_CACHE:-$HOME/.cache/mmorepa}"
MMCV_VERSION=2.1.0

log() { printf '[setup] %s\n' "$*" >&2; }

# What the stamp covers: every file that decides what gets installed.
stamp_of() {
    cat "$ROOT"/requirements/*.txt "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/tools/setup_env.sh" \
        "$ROOT"/mmorepa/csrc/* | sha256sum | cut -d' ' -f1
}
STAMP="$VENV/.mmorepa-stamp"
WANT="$(stamp_of)"

# Everything imports, and the extension loads (built, and for this torch).
READY='import mmcv.ops, mmdet, mmseg, mmpretrain, mmorepa
from mmorepa.ops.extension import squeeze_cpu, unavailable_reason
assert squeeze_cpu is not None, "mmorepa._squeeze_cpu not loaded: %s" % unavailable_reason()'
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && "$PY" -c "$READY" 2>/dev/null; then
    log "environment ready ($VENV)"
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$PY" ]]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
PIP=("$PY" -m pip install --disable-pip-version-check --no-input)

"${PIP[@]}" -q --upgrade pip
log "installing torch + torchvision"
"${PIP[@]}" -q -r "$ROOT/requirements/torch.txt"
"${PIP[@]}" -q -r "$ROOT/requirements/build.txt"

TORCH_TAG="$("$PY" -c 'import sys, torch; v = torch.__version__.split("+")[0]; print("torch%s-py%d%d" % (v, *sys.version_info[:2]))')"
WHEEL_DIR="$CACHE/mmcv-$MMCV_VERSION-$TORCH_TAG"
if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" 2>/dev/null; then
    wheel="$(ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$wheel" ]]; then
        log "building mmcv $MMCV_VERSION with its ops from source (about 10 minutes on 2 cores)"
        work="$(mktemp -d)"
        trap 'rm -rf "$work"' EXIT
        "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
            "mmcv==$MMCV_VERSION" -d "$work"
        tar -xzf "$work/mmcv-$MMCV_VERSION.tar.gz" -C "$work"
        src="$work/mmcv-$MMCV_VERSION"
        # torch >= 2.10 headers require C++20; mmcv 2.1.0 hard-codes C++17.
        sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
        mkdir -p "$WHEEL_DIR"
        (cd "$src" && MMCV_WITH_OPS=1 MAX_JOBS="$(nproc)" \
            "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" .)
        # Move into the cache atomically so an interrupted build never leaves a broken wheel there.
        built="$(ls "$work"/dist/mmcv-*.whl)"
        cp "$built" "$WHEEL_DIR/.partial.whl"
        mv "$WHEEL_DIR/.partial.whl" "$WHEEL_DIR/$(basename "$built")"
        wheel="$WHEEL_DIR/$(basename "$built")"
    else
        log "reusing cached $wheel"
    fi
    "${PIP[@]}" -q --no-deps "$wheel"
fi

log "installing mmengine, mmpretrain, mmdet, mmsegmentation and test requirements"
"${PIP[@]}" -q -r "$ROOT/requirements/mminstall.txt" -r "$ROOT/requirements/runtime.txt" \
    -r "$ROOT/requirements/tests.txt"
# mmcv's own dependencies (installed above with --no-deps)
"${PIP[@]}" -q addict packaging Pillow pyyaml yapf opencv-python
log "installing mmorepa (editable) with its C++ extension"
MMOREPA_BUILD_EXT=1 "${PIP[@]}" -q --no-deps --no-build-isolation -e "$ROOT"

"$PY" -c "$READY"
echo "$WANT" >"$STAMP"
log "environment ready in $(($(date +%s) - start)) s"
