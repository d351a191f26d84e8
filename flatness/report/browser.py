"""Check a report in headless Chromium: every image decodes, the table renders.

Used by the tests and by ``python scripts/check_report.py REPORT.html
[--screenshot PNG]``. Needs Debian's ``chromium`` (or ``chromium-browser`` /
``google-chrome``) on PATH; :func:`find_chromium` returns None otherwise.

How: a copy of the page gets a small script that, after the load event,
writes a JSON verdict (images loaded / total, table rows, first-row cells)
into a ``<pre id="flatness-check">`` element; ``chromium --headless
--dump-dom`` prints the resulting DOM, from which the verdict is read.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from flatness.errors import FlatnessError

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

PROBE = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var table = document.querySelector('table');
  var rows = table ? table.tBodies[0].rows.length : 0;
  var box = table ? table.getBoundingClientRect() : {width: 0, height: 0};
  var out = document.createElement('pre');
  out.id = 'flatness-check';
  out.textContent = JSON.stringify({images: imgs.length, loaded: ok, rows: rows,
                                    table_width: box.width, table_height: box.height});
  document.body.appendChild(out);
});
</script>
"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def check_report(html: Path, *, screenshot: Path | None = None, timeout: float = 120) -> dict:
    """Load ``html`` in headless Chromium; return the verdict dict.

    Raises:
        FlatnessError: no Chromium on PATH, or no readable ``html``.
        RuntimeError: Chromium ran but produced no verdict.
    """
    exe = find_chromium()
    if exe is None:
        raise FlatnessError("no chromium on PATH (tried chromium, chromium-browser, google-chrome); install one, "
                            "e.g. apt-get install chromium")
    if not html.is_file():
        raise FlatnessError(f"no report at {html}")
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        page = html.read_text()
        probe.write_text(page.replace("</body>", PROBE + "</body>"))
        args = [exe, *FLAGS, f"--user-data-dir={tmp}/profile", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        m = re.search(r'<pre id="flatness-check">(.*?)</pre>', r.stdout, re.S)
        if not m:
            raise RuntimeError(f"chromium gave no verdict (exit {r.returncode}): {r.stderr[-500:]}")
        verdict = json.loads(m.group(1).replace("&quot;", '"'))
        if screenshot is not None:
            shot = [exe, *FLAGS, f"--user-data-dir={tmp}/profile2", "--window-size=1200,2400", f"--screenshot={screenshot}", html.resolve().as_uri()]
            subprocess.run(shot, capture_output=True, timeout=timeout)
    return verdict

