"""Check a report in headless Chromium and print the verdict as JSON.

    python scripts/check_report.py demo/report/report.html --screenshot shot.png

Without Chromium (or without the report) it prints one line ``error: ...``
on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flatness.errors import FlatnessError
from flatness.report.browser import check_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("html", type=Path)
    p.add_argument("--screenshot", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        verdict = check_report(args.html, screenshot=args.screenshot)
    except FlatnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
