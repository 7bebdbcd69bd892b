#!/usr/bin/env bash
# Build rabbitflow as users install it (sdist + wheel, `python -m build`), install each into a
# fresh venv outside the checkout, and run the installed command. Idempotent: everything is
# built in a temporary directory, removed at exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
python=${PYTHON:-.venv/bin/python}

if ! "$python" -m build --version >/dev/null 2>&1; then
  echo "installing build"
  "$python" -m pip install -q build
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m build --outdir "$work/dist" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/rabbitflow-*.whl)
sdist=$(ls "$work"/dist/rabbitflow-*.tar.gz)

python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$wheel"
check() {
  # From a directory without the checkout, so that the installed package is the one imported.
  (cd "$work" && "$work/venv/bin/rabbitflow" --version \
    && "$work/venv/bin/rabbitflow" topology validate "$root/topology.toml" \
    && "$work/venv/bin/python" -c "import rabbitflow; print(rabbitflow.App.__module__)")
}
check
echo "wheel $(basename "$wheel") installs and runs"
"$work/venv/bin/python" -m pip install -q --force-reinstall --no-deps "$sdist"
check
echo "sdist $(basename "$sdist") installs and runs"
