"""Check a report in headless Chromium and print the verdict as JSON.

    python scripts/check_report.py demo/report/report.html --screenshot shot.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flatness.report.browser import check_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("html", type=Path)
    p.add_argument("--screenshot", type=Path, default=None)
    args = p.parse_args(argv)
    print(json.dumps(check_report(args.html, screenshot=args.screenshot)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
