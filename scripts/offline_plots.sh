#!/usr/bin/env bash
# Offline `dvc plots show`.
#
# Why: DVC's default HTML page loads vega, vega-lite and vega-embed from cdn.jsdelivr.net,
# so without internet the vega plots (reports/rank/top_*.csv) render blank. This script
# fetches the versions that page pins (dvc_render.vega.VegaRenderer.SCRIPTS, dvc_render 1.0.2)
# from the npm registry with `npm pack`, inlines their minified builds into an HTML template
# under the git-ignored plots_offline/ and renders with `dvc plots show --html-template`.
# The template has no `{scripts}` placeholder, so DVC's CDN <script> tags are dropped, and
# the written page is self-contained. Idempotent: a tarball already in plots_offline/npm/
# is not fetched again; the template is rewritten from the tarballs on every run.
# Usage: scripts/offline_plots.sh [extra `dvc plots show` args, e.g. -o DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2)
dir=plots_offline
template=$dir/template.html
mkdir -p "$dir/npm"

{
  # charset first: the minified builds contain non-ASCII characters.
  printf '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n{refresh_tag}\n<title>DVC Plot</title>\n'
  for spec in "${pkgs[@]}"; do
    name=${spec%@*}
    tgz=$dir/npm/$name-${spec#*@}.tgz
    [[ -s $tgz ]] || npm pack "$spec" --pack-destination "$dir/npm" --loglevel=error >/dev/null
    printf '<script>/* %s (npm) */\n' "$spec"
    tar -xzOf "$tgz" "package/build/$name.min.js"
    printf '\n</script>\n'
  done
  printf '<style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n'
} >"$template.tmp"
mv "$template.tmp" "$template"

dvc=.venv/bin/dvc
[[ -x $dvc ]] || dvc=dvc
exec "$dvc" plots show --html-template "$template" "$@"
