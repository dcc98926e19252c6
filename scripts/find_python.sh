#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter, or fail with a clear message.
# Order: $PYTHON, python3.12/python3.13 on PATH, python3 if new enough, then pyenv's installed versions
# (3.12 first: it is the GPU image's version).
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
for name in python3.12 python3.13 python3; do
  p=$(command -v "$name" 2>/dev/null) && candidates+=("$p")
done
pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
if [ -d "$pyenv_root/versions" ]; then
  for d in $(ls -1 "$pyenv_root/versions" | grep '^3\.12' | sort -rV) $(ls -1 "$pyenv_root/versions" | sort -rV); do
    candidates+=("$pyenv_root/versions/$d/bin/python3")
  done
fi
for c in "${candidates[@]}"; do
  if [ -x "$c" ] && ok "$c"; then echo "$c"; exit 0; fi
done
echo "error: infllm-jax needs Python >= 3.12 (jax 0.11 requires it), and none was found." >&2
echo "       Looked at \$PYTHON, python3.13, python3.12, python3 on PATH and $pyenv_root/versions/*." >&2
echo "       Install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12." >&2
exit 1
