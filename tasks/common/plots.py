"""``dvc plots show`` offline: an HTML template with the Vega libraries inlined.

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN, so with no network it renders
a blank page. ``vl-convert-python`` carries those libraries (its ``javascript_bundle`` defines
``vegaEmbed``, which DVC's plot snippets call); this writes them into the template that
``.dvc/config`` names (``plots.html_template``). The template leaves out DVC's ``{scripts}``
placeholder, where the CDN tags would go. ``make setup`` runs it:

    python -m tasks.common.plots      # writes .dvc/plots/offline.html
"""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.common.env import REPO_ROOT
from tasks.common.storage import atomic_write_bytes

TEMPLATE = Path(".dvc") / "plots" / "offline.html"
PAGE = """<!DOCTYPE html>
<html>
<head>
  <meta charset="utf-8">
  <title>llmforge: DVC plots</title>
  <!-- Vega {vega}, Vega-Lite {vegalite}, Vega-Embed {embed}, inlined by tasks/common/plots.py: no network needed -->
  <script>{bundle}</script>
  <style>body {{ font-family: sans-serif; }} table {{ border-spacing: 15px; }}</style>
</head>
<body>
  {{plot_divs}}
</body>
</html>
"""


def offline_template() -> str:
    import vl_convert as vlc

    bundle = vlc.javascript_bundle().replace("</script", "<\\/script")
    return PAGE.format(
        vega=vlc.get_vega_version(),
        vegalite=vlc.get_vegalite_versions()[-1],
        embed=vlc.get_vega_embed_version(),
        bundle=bundle,
    )


def write_offline_template(root: Path = REPO_ROOT) -> Path:
    path = root / TEMPLATE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, offline_template().encode("utf-8"))
    return path


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT
    print(f"offline DVC plot template: {write_offline_template(root)}")
