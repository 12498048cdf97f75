#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install TSKD with everything it
# needs from the package registries. Re-running is cheap: it reinstalls only when pyproject.toml
# changed. Python 3.12 (the Python of Slicer 5.10 and later) is the main runtime: a new
# environment is made with python3.12, found on PATH or in pyenv. Override the interpreter with
# PYTHON=/path/to/python (any Python >= 3.11 works for the command line).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TSKD_VENV:-.venv}

find_python312() {
  local cand
  # A pyenv shim named python3.12 exists even when 3.12 is not the active version: run it to check.
  if cand=$(command -v python3.12) && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    echo "$cand"; return 0
  fi
  local root
  root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
  for cand in $(ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r) \
              /usr/local/bin/python3.12 /usr/bin/python3.12 "$HOME/.local/bin/python3.12"; do
    if [ -x "$cand" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
  elif ! PY=$(find_python312); then
    cat >&2 <<'MSG'
[bootstrap] Python 3.12 was not found (TSKD's main runtime, as in Slicer 5.10 and later).
  Get it with one of:
    pyenv install 3.12            (https://github.com/pyenv/pyenv)
    uv python install 3.12        (https://docs.astral.sh/uv/)
    sudo apt install python3.12   (Debian/Ubuntu with python3.12 packages)
    the installer from https://www.python.org/downloads/
  or use another Python >= 3.11 on purpose:  PYTHON=python3.11 bash scripts/bootstrap.sh
MSG
    exit 1
  fi
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "[bootstrap] $PY is $("$PY" --version 2>&1); TSKD needs Python >= 3.11 (3.12 preferred)." >&2
    exit 1
  fi
  echo "[bootstrap] creating $VENV with $("$PY" --version 2>&1) ($PY)"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  echo "[bootstrap] note: $VENV uses $("$VENV/bin/python" --version 2>&1); CI uses Python 3.12" \
       "(remove $VENV to recreate it with 3.12)." >&2
fi
stamp="$VENV/.tskd-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] installing TSKD and its dependencies into $VENV (first time: several minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
