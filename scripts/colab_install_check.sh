#!/usr/bin/env bash
# The notebooks' install cell, as Colab runs it: a fresh venv that already has a torch (Colab's own), then
# the cell's commands. The preinstalled torch must stay, lora_nb must import, and notebook 01 must run.
#
#   bash scripts/colab_install_check.sh
#   TORCH_INSTALL="torch==2.12.0 --index-url https://download.pytorch.org/whl/cpu" \
#     bash scripts/colab_install_check.sh
#
# The clone is of this repository's committed HEAD (the cell's URL replaced by this folder: no network
# needed), so uncommitted changes are not in it, as in a fresh clone. Takes a few minutes (pip installs).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
py="$work/venv/bin/python"

python3 -m venv "$work/venv"
# shellcheck disable=SC2086  # TORCH_INSTALL is a requirement plus pip options, split on purpose
"$py" -m pip install -q ${TORCH_INSTALL:-torch==2.13.0+cpu}
before=$("$py" -c "import torch; print(torch.__version__)")
echo "preinstalled torch: $before"

# The cell's lines, with /content moved into the work folder and the clone URL pointed at this repository.
"$py" - "$repo/notebooks/01-low-rank.ipynb" "$repo" "$work" > "$work/cell.sh" <<'EOF'
import json, re, sys
notebook, repo, work = sys.argv[1:]
cell = next("".join(c["source"]) for c in json.load(open(notebook))["cells"]
            if c["cell_type"] == "code" and '"google.colab" in sys.modules' in "".join(c["source"]))
lines = [line.strip() for line in cell.splitlines()[2:]]
url = re.search(r"git clone -q (\S+)", cell).group(1)
for line in lines:
    line = line.replace(url, repo).replace("/content", f"{work}/content")
    line = re.sub(r"^!", "", line)
    line = re.sub(r"^%pip ", f'"{work}/venv/bin/python" -m pip ', line)
    print(re.sub(r"^%cd ", "cd ", line))
EOF
echo "the install cell, as run here:" && sed 's/^/  /' "$work/cell.sh"
# shellcheck disable=SC1091
source "$work/cell.sh"

after=$("$py" -c "import torch, lora_nb; print(torch.__version__)")
[ "$after" = "$before" ] || { echo "FAILED: the install replaced torch $before with $after"; exit 1; }
echo "torch kept ($after); lora_nb imports from $("$py" -c 'import lora_nb; print(lora_nb.__file__)')"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$py" -m papermill -k python3 --no-progress-bar \
  01-low-rank.ipynb "$work/01-low-rank.ipynb" -p output_dir "$work/out"
echo "colab install check passed: notebook 01 ran in the fresh environment"
