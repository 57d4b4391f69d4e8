#!/usr/bin/env bash
# The README's report screenshot: hwquant report RUN_DIR, then Debian's chromium (headless) renders the page.
# usage: scripts/report_screenshot.sh RUN_DIR [OUT_PNG]   (default docs/report.png)
set -euo pipefail
run_dir=$1
out=${2:-docs/report.png}
.venv/bin/hwquant report "$run_dir" --out "$run_dir/report"
mkdir -p "$(dirname "$out")"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,2400 \
  --virtual-time-budget=5000 --screenshot="$out" "file://$(realpath "$run_dir/report/report.html")" 2>/dev/null
echo "$out"
