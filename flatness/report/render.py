"""Write ``report.json``, ``report.md`` (figures beside it) and a self-contained ``report.html``."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from flatness.atomic import atomic_write_text
from flatness.report.stats import MEASURES, conclusion, group_stats, kendall

# What each measure responds to, printed under the table so that disagreeing measures can be read.
MEASURE_NOTES = [
    "lambda_max and trace: curvature of the mean loss on the analysis samples, in eval mode (BatchNorm uses its "
    "running statistics), at the checkpoint's own scale: a network whose filters have small norms looks sharp "
    "even if it is only rescaled (Dinh et al. 2017); lambda_max also falls with training length, so compare "
    "methods at equal updates.",
    "Random-perturbation sharpness: mean loss increase under filter-wise Gaussian noise of std sigma x ||filter||, "
    "so the radius is relative to each filter's norm (scale-invariant), averaged over a few draws; it sees the "
    "whole spectrum (about sigma^2/2 x sum of curvature weighted by squared filter norms), not only the top "
    "direction, and can disagree with lambda_max.",
    "Adversarial sharpness: loss increase after one normalized gradient step of absolute length rho (not "
    "relative to weight norms), in eval mode; near a minimum with a small gradient it depends on the direction "
    "the gradient happens to point to.",
    "All measures use the same training samples in eval mode; train loss in training mode (augmentation, "
    "batch statistics) differs.",
]

# (column title, entry key, format)
COLUMNS = [
    ("checkpoint", "label", "{}"),
    ("method", "method_label", "{}"),
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
    v["method_label"] = e.get("group") or e.get("method")
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


def json_safe(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def report_json(result: Any, settings: Any, dataset: str, version: str) -> dict[str, Any]:
    keep = ("path", "label", "group", "seed", "method", "config", "sha256", "cost", "train_loss", "train_acc",
            "test_loss", "test_acc", "top_eigenvalues", "eigen_residuals", "eigen_converged", "trace", "trace_stderr",
            "hvp_count", "bn_mode", "sharpness", "adversarial_sharpness", "adversarial_rho", "interpolation", "surface",
            "density", "curvature_track", "per_layer", "provenance")
    stats = group_stats(result.entries)
    return json_safe({
        "version": version,
        "dataset": dataset,
        "settings": settings.to_dict(),
        "notes": list(getattr(result, "notes", [])),
        "groups": getattr(result, "groups", {}),
        "methods": stats,
        "conclusion": conclusion(stats),
        "kendall_tau": kendall(result.entries) if len(result.entries) >= 3 else {},
        "measure_notes": MEASURE_NOTES,
        "checkpoints": [{k: e.get(k) for k in keep if k in e} for e in result.entries],
        "computed": result.computed,
        "reused": result.reused,
        "seconds": result.seconds,
    })


PROVENANCE_COLUMNS = ("checkpoint", "checkpoint sha256", "group", "seed", "samples", "sample indices sha256",
                      "train data sha256", "user code", "flatness / torch / python", "device", "accepted changes")


def provenance_table(entries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per checkpoint: what produced each number of the report (DESIGN.md section 9)."""
    rows = []
    for e in entries:
        p = e.get("provenance") or {}
        run = p.get("run") or {}
        samples = p.get("samples") or {}
        code = [f"{role}: {Path(r['file']).name}@{r['sha256'][:12]}" for role, r in (run.get("code") or {}).items() if "sha256" in r]
        v = p.get("versions") or {}
        rows.append([
            str(e.get("path")), str((p.get("checkpoint") or {}).get("sha256", ""))[:16], str(e.get("group")), str(e.get("seed")),
            f"{samples.get('count')} of {samples.get('of')} ({samples.get('split')}: {samples.get('description', '')})",
            str(samples.get("indices_sha256", ""))[:16],
            str(((run.get("data") or {}).get("train") or {}).get("sha256", "not recorded"))[:16],
            "; ".join(code) or "built-in", f"{v.get('flatness')} / {v.get('torch')} / {v.get('python')}", str(p.get("device")),
            "; ".join(p.get("accepted_changes") or []) or "none",
        ])
    return list(PROVENANCE_COLUMNS), rows


def _pm(cell: dict[str, Any] | None, digits: int = 3) -> str:
    if not cell or cell.get("mean") is None:
        return "-"
    sd = cell.get("sd")
    return f"{cell['mean']:.{digits}g}" + (f" ± {sd:.2g}" if sd is not None else "")


def method_rows(stats: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Per-method table: seeds, cost next to the results (mean ± sd over seeds)."""
    head = ["method", "seeds", "updates", "grad evals", "train s"] + [MEASURES[k][0] for k in MEASURES]
    rows = []
    for g, r in stats.items():
        cost = [_fmt("{:.0f}", r.get("updates")), _fmt("{:.0f}", r.get("grad_evals")), _fmt("{:.1f}", r.get("train_seconds"))]
        rows.append([g, str(r["seeds"]), *cost, *(_pm(r[k], 4 if k == "test_acc" else 3) for k in MEASURES)])
    return head, rows


def paired_verdict(g: str, base: str, p: dict[str, Any], higher_is_better: bool) -> str:
    """``"m-arwp lower than sgd (better): interval excludes 0"`` or ``"within noise: interval contains 0"``."""
    if p["within_noise"]:
        return "within noise: interval contains 0"
    side = "higher" if p["mean"] > 0 else "lower"
    better = (p["mean"] > 0) == higher_is_better
    return f"{g} {side} than {base} ({'better' if better else 'worse'}): interval excludes 0"


def paired_rows(stats: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Paired differences A - B of every measure in :data:`MEASURES` (the ones report.json holds), with a verdict that names the side."""
    head = ["method", "vs", "measure", "mean diff", "95% CI", "wins", "verdict"]
    rows = []
    for g, r in stats.items():
        for base, diffs in r.get("paired", {}).items():
            for k, (title, higher) in MEASURES.items():
                p = diffs.get(k)
                if p is None:
                    continue
                rows.append([g, base, title, f"{p['mean']:+.3g}", f"[{p['ci95'][0]:+.3g}, {p['ci95'][1]:+.3g}]",
                             f"{p['wins']}/{p['n']}", paired_verdict(g, base, p, higher)])
    return head, rows


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows), ""]


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f'<td data-v="{html.escape(c)}">{html.escape(c)}</td>' for c in r) + "</tr>" for r in rows)
    return f'<table class="sortable"><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>'


def _budget_text(entries: list[dict[str, Any]]) -> str:
    """One line per checkpoint trained here: epochs, parameter updates, gradient evaluations, wall time."""
    lines = []
    for e in entries:
        cfg, cost = e.get("config") or {}, e.get("cost") or {}
        if cfg.get("method") is None or "epochs" not in cfg:
            continue
        scheme = f", {cfg.get('mix_batches')} batches" if cfg["method"] in ("m-rwp", "m-arwp") else ""
        parts = [f"{e['label']}: --epochs {cfg['epochs']}{scheme}"]
        for key, name in (("updates", "updates"), ("grad_evals", "gradient evaluations")):
            if cost.get(key) is not None:
                parts.append(f"{cost[key]} {name}")
        if cost.get("train_seconds") is not None:
            parts.append(f"{cost['train_seconds']:.1f} s training")
        lines.append(", ".join(parts))
    return "\n".join(lines)


def _sections(result: Any) -> list[tuple[str, list[str], list[list[str]] | None, list[str]]]:
    """(title, table head, table rows, paragraphs) of the seed-statistics sections, shared by Markdown and HTML."""
    stats = group_stats(result.entries)
    out = []
    if getattr(result, "notes", None):
        out.append(("Protocol and hyperparameters", [], None, list(result.notes)))
    if any(r["seeds"] > 1 for r in stats.values()) or len(stats) < len(result.entries):
        head, rows = method_rows(stats)
        out.append(("Methods (mean ± sd over seeds)", head, rows, []))
        head, rows = paired_rows(stats)
        if rows:
            out.append(("Paired differences (A - B over the same seeds, 95% t-interval)", head, rows, []))
        out.append(("Conclusion (generated from the numbers above)", [], None, conclusion(stats)))
    taus = kendall(result.entries) if len(result.entries) >= 3 else {}
    if taus:
        rows = [[MEASURES[k][0], _fmt("{:+.3f}", v["tau"]), _fmt("{:.3g}", v["p_value"]), str(v["n"])] for k, v in taus.items()]
        out.append(("Flatness vs test accuracy (Kendall tau across checkpoints)", ["measure", "tau", "p-value", "n"], rows,
                    ["Negative tau: flatter (smaller measure) goes with higher test accuracy (Jiang et al. 2020)."]))
    track = _tracking_rows(result.entries)
    if track:
        out.append(("Curvature during training (curvature.jsonl)", ["run", "points", "first λ_max", "max λ_max", "last λ_max",
                                                                    "2/lr", "measuring: % extra over untracked training"], track,
                    ["2/lr: the gradient-descent stability threshold (Cohen et al. 2021), shown for SGD only; "
                     "lambda_max is measured on the trainer's fixed analysis batch, so it is comparable within a run."]))
    out.append(("What each measure is sensitive to", [], None, MEASURE_NOTES))
    return out


def tracking_summary(e: dict[str, Any]) -> dict[str, Any] | None:
    """Points, first / max / last lambda_max and the measuring cost of one run's curvature.jsonl.

    ``percent`` is the extra cost over untracked training, (tracked - untracked) / untracked in %:
    the run's last ``extra_fraction`` (metrics.jsonl, measured by the trainer on one clock); for runs
    of older versions, ``f / (1 - f)`` of their ``curvature_fraction`` f = measuring / (training +
    measuring); else the curvature seconds over the training seconds.
    """
    rows = [r for r in (e.get("curvature_track") or []) if r.get("lambda_max") is not None]
    if not rows:
        return None
    lam = [float(r["lambda_max"]) for r in rows]
    cfg = e.get("config") or {}
    train_s = (e.get("cost") or {}).get("train_seconds")
    spent = sum(float(r.get("curvature_seconds", 0.0)) for r in rows)
    percent = 100.0 * spent / train_s if train_s else None
    last = (e.get("training_curve") or [{}])[-1]
    if isinstance(last, dict) and isinstance(last.get("extra_fraction"), (int, float)):
        percent = 100.0 * float(last["extra_fraction"])
    elif isinstance(last, dict) and isinstance(last.get("curvature_fraction"), (int, float)) and 0 <= last["curvature_fraction"] < 1:
        percent = 100.0 * float(last["curvature_fraction"]) / (1.0 - float(last["curvature_fraction"]))
    return {"points": len(rows), "first": lam[0], "max": max(lam), "last": lam[-1],
            "threshold": 2.0 / cfg["lr"] if cfg.get("method") == "sgd" and cfg.get("lr") else None,
            "percent": percent}


def _tracking_rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for e in entries:
        t = tracking_summary(e)
        if t is not None:
            rows.append([e["label"], str(t["points"]), f"{t['first']:.4g}", f"{t['max']:.4g}", f"{t['last']:.4g}",
                         _fmt("{:.3g}", t["threshold"]), _fmt("{:.1f}", t["percent"])])
    return rows


def write_reports(result: Any, settings: Any, figures: dict[str, Path], *, dataset: str, version: str) -> None:
    out: Path = result.out
    data = report_json(result, settings, dataset, version)
    atomic_write_text(out / "report.json", json.dumps(data, indent=2, allow_nan=False) + "\n")
    rows = [_row_values(e) for e in result.entries]
    budget = _budget_text(result.entries)
    settings_text = json.dumps(settings.to_dict(), indent=2)
    sections = _sections(result)

    # Markdown
    md = ["# flatness comparison report\n", f"Dataset: {dataset}. flatness {version}. {len(rows)} checkpoint(s).\n"]
    md += _md_table([c[0] for c in COLUMNS], [[_fmt(f, r.get(k)) for _, k, f in COLUMNS] for r in rows])
    for e in result.entries:
        md.append(f"- **{e['label']}**: `{e['path']}` (top eigenvalues: {', '.join(f'{v:.4g}' for v in e['top_eigenvalues'])})")
    for title, head, trows, paras in sections:
        md += ["", f"## {title}", ""]
        md += _md_table(head, trows) if trows is not None else []
        md += [f"- {p}" for p in paras]
    if budget:
        md += ["", "## Budget", "", "```", budget, "```"]
    for title, path in figures.items():
        md += ["", f"## {title}", "", f"![{title}]({path.name})"]
    prov_head, prov_rows = provenance_table(result.entries)
    md += ["", "## Provenance", ""] + _md_table(prov_head, prov_rows)
    md += ["", "## Settings", "", "```json", settings_text, "```", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "report.html", _html_page(result, rows, sections, budget, figures, settings_text, dataset, version))


def _html_page(result: Any, rows: list[dict[str, Any]], sections: list, budget: str, figures: dict[str, Path],
               settings_text: str, dataset: str, version: str) -> str:
    """One self-contained page: figures as data URIs, no external URLs."""
    head = "".join(f"<th>{html.escape(c[0])}</th>" for c in COLUMNS)
    body = []
    for r in rows:
        cells = []
        for _, k, f in COLUMNS:
            v = r.get(k)
            sort_v = v if isinstance(v, (int, float)) else str(v)
            cells.append(f'<td data-v="{html.escape(str(sort_v))}">{html.escape(_fmt(f, v))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    extra = []
    for title, thead, trows, paras in sections:
        extra.append(f"<h2>{html.escape(title)}</h2>")
        if trows is not None:
            extra.append(_html_table(thead, trows))
        extra += [f"<p>{html.escape(p)}</p>" for p in paras]
    figs = []
    for title, path in figures.items():
        b64 = base64.b64encode(path.read_bytes()).decode()
        figs.append(f"<h2>{html.escape(title)}</h2><img alt=\"{html.escape(title)}\" src=\"data:image/png;base64,{b64}\">")
    paths = "".join(f"<li><b>{html.escape(e['label'])}</b>: <code>{html.escape(e['path'])}</code></li>" for e in result.entries)
    budget_html = f"<h2>Budget</h2><pre>{html.escape(budget)}</pre>" if budget else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>flatness report</title><style>{CSS}</style></head>
<body>
<h1>flatness comparison report</h1>
<p class="muted">Dataset {html.escape(dataset)} &middot; flatness {html.escape(version)} &middot; {len(rows)} checkpoint(s) &middot; click a column to sort</p>
<table class="sortable" id="summary"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>
<ul>{paths}</ul>
{''.join(extra)}
{budget_html}
{''.join(figs)}
<h2>Provenance</h2>{_html_table(*provenance_table(result.entries))}
<h2>Settings</h2><pre>{html.escape(settings_text)}</pre>
<script>{SORT_JS}</script>
</body></html>
"""
