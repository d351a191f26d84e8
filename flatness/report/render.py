"""Write ``report.json``, ``report.md`` (figures beside it) and a self-contained ``report.html``."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from flatness.atomic import atomic_write_text

# (column title, entry key, format)
COLUMNS = [
    ("checkpoint", "label", "{}"),
    ("method", "method", "{}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("train acc %", "train_acc", "{:.2f}"),
    ("test loss", "test_loss", "{:.4f}"),
    ("test acc %", "test_acc", "{:.2f}"),
    ("λ_max", "lambda_max", "{:.4g}"),
    ("trace", "trace", "{:.4g}"),
    ("adv. sharpness", "adversarial_sharpness", "{:.4g}"),
    ("rand. sharpness @σmax", "sharpness_max", "{:.4g}"),
]

SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
    var rows = Array.from(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
td:first-child, td:nth-child(2) { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.muted { color: #666; font-size: 0.9em; }
"""


def _row_values(e: dict[str, Any]) -> dict[str, Any]:
    v = dict(e)
    v["lambda_max"] = e["top_eigenvalues"][0] if e.get("top_eigenvalues") else float("nan")
    inc = e["sharpness"]["loss_increase"]
    v["sharpness_max"] = inc[-1] if inc else float("nan")
    return v


def _fmt(fmt: str, value: Any) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def report_json(result: Any, settings: Any, dataset: str, version: str) -> dict[str, Any]:
    keep = ("path", "label", "method", "config", "sha256", "train_loss", "train_acc", "test_loss", "test_acc",
            "top_eigenvalues", "eigen_residuals", "eigen_converged", "trace", "trace_stderr", "hvp_count",
            "sharpness", "adversarial_sharpness", "adversarial_rho", "interpolation", "surface", "density")
    return {
        "version": version,
        "dataset": dataset,
        "settings": settings.to_dict(),
        "checkpoints": [{k: e.get(k) for k in keep if k in e} for e in result.entries],
        "computed": result.computed,
        "reused": result.reused,
        "seconds": result.seconds,
    }


def _budget_text(entries: list[dict[str, Any]]) -> str:
    """One line per checkpoint trained here: epochs x gradient evaluations per batch."""
    from flatness.training.config import TrainConfig
    from flatness.training.methods import grad_evals_per_batch

    lines = []
    for e in entries:
        cfg = e.get("config") or {}
        if cfg.get("method") is None or "epochs" not in cfg:
            continue
        try:
            evals = grad_evals_per_batch(TrainConfig.from_dict(cfg))
        except Exception:  # noqa: BLE001 - a config we cannot read just has no budget line
            continue
        scheme = f", {cfg['mix_batches']} batches" if cfg["method"] in ("m-rwp", "m-arwp") else ""
        lines.append(
            f"{e['label']}: {cfg['epochs']} epochs x {evals} gradient evaluation(s) per batch{scheme} "
            f"= {cfg['epochs'] * evals} epoch-equivalents"
        )
    return "\n".join(lines)


def write_reports(result: Any, settings: Any, figures: dict[str, Path], *, dataset: str, version: str) -> None:
    out: Path = result.out
    data = report_json(result, settings, dataset, version)
    atomic_write_text(out / "report.json", json.dumps(data, indent=2) + "\n")
    rows = [_row_values(e) for e in result.entries]
    budget = _budget_text(result.entries)
    settings_text = json.dumps(settings.to_dict(), indent=2)

    # Markdown
    md = ["# flatness comparison report\n", f"Dataset: {dataset}. flatness {version}. {len(rows)} checkpoint(s).\n"]
    md.append("| " + " | ".join(c[0] for c in COLUMNS) + " |")
    md.append("|" + "---|" * len(COLUMNS))
    for r in rows:
        md.append("| " + " | ".join(_fmt(f, r.get(k)) for _, k, f in COLUMNS) + " |")
    md.append("")
    for e in result.entries:
        md.append(f"- **{e['label']}**: `{e['path']}` (top eigenvalues: {', '.join(f'{v:.4g}' for v in e['top_eigenvalues'])})")
    if budget:
        md += ["", "## Budget", "", "```", budget, "```"]
    for title, path in figures.items():
        md += ["", f"## {title}", "", f"![{title}]({path.name})"]
    md += ["", "## Settings", "", "```json", settings_text, "```", ""]
    atomic_write_text(out / "report.md", "\n".join(md))

    # HTML, one file: figures as data URIs, no external URLs.
    head = "".join(f"<th>{html.escape(c[0])}</th>" for c in COLUMNS)
    body = []
    for r in rows:
        cells = []
        for _, k, f in COLUMNS:
            v = r.get(k)
            sort_v = v if isinstance(v, (int, float)) else str(v)
            cells.append(f'<td data-v="{html.escape(str(sort_v))}">{html.escape(_fmt(f, v))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    figs = []
    for title, path in figures.items():
        b64 = base64.b64encode(path.read_bytes()).decode()
        figs.append(f"<h2>{html.escape(title)}</h2><img alt=\"{html.escape(title)}\" src=\"data:image/png;base64,{b64}\">")
    paths = "".join(f"<li><b>{html.escape(e['label'])}</b>: <code>{html.escape(e['path'])}</code></li>" for e in result.entries)
    budget_html = f"<h2>Budget</h2><pre>{html.escape(budget)}</pre>" if budget else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>flatness report</title><style>{CSS}</style></head>
<body>
<h1>flatness comparison report</h1>
<p class="muted">Dataset {html.escape(dataset)} &middot; flatness {html.escape(version)} &middot; {len(rows)} checkpoint(s) &middot; click a column to sort</p>
<table class="sortable" id="summary"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>
<ul>{paths}</ul>
{budget_html}
{''.join(figs)}
<h2>Settings</h2><pre>{html.escape(settings_text)}</pre>
<script>{SORT_JS}</script>
</body></html>
"""
    atomic_write_text(out / "report.html", page)
