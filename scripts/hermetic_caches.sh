# Sourced by scripts/test.sh and .ci/run: every run gets fresh, empty cache folders under one
# temporary directory, removed when the shell exits, so caches warmed by earlier runs on this machine
# (Triton kernels, torch inductor / extensions, Hugging Face, matplotlib, XDG) can never hide a
# fresh-machine failure. pip's download cache is left alone (it only saves downloads).
# pip's cache (downloads, and the wheel it built of llama-cpp-python) stays where it was: pin it
# before XDG_CACHE_HOME moves
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pip}
EFFQAT_CACHE_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/effqat-caches.XXXXXX")
export EFFQAT_CACHE_ROOT
export TRITON_HOME="$EFFQAT_CACHE_ROOT/triton-home"
export TRITON_CACHE_DIR="$EFFQAT_CACHE_ROOT/triton"
export TORCHINDUCTOR_CACHE_DIR="$EFFQAT_CACHE_ROOT/torchinductor"
export TORCH_EXTENSIONS_DIR="$EFFQAT_CACHE_ROOT/torch_extensions"
export HF_HOME="$EFFQAT_CACHE_ROOT/huggingface"
export MPLCONFIGDIR="$EFFQAT_CACHE_ROOT/matplotlib"
export XDG_CACHE_HOME="$EFFQAT_CACHE_ROOT/xdg"
mkdir -p "$TRITON_HOME" "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR" "$TORCH_EXTENSIONS_DIR" \
  "$HF_HOME" "$MPLCONFIGDIR" "$XDG_CACHE_HOME"
# shellcheck disable=SC2064
trap "rm -rf '$EFFQAT_CACHE_ROOT'" EXIT
