"""The python blocks under README.md's "## In your training stack" run as written (Lightning, HF Trainer, plain loop)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

HEADING = "## In your training stack"


def python_blocks(text: str, heading: str = HEADING) -> list[str]:
    """The ```python blocks between ``heading`` and the next level-2 heading."""
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + len(heading) + 2)
    section = text[start : end if end != -1 else len(text)]
    return re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)


BLOCKS = python_blocks((REPO / "README.md").read_text())


def test_three_snippets() -> None:
    assert len(BLOCKS) == 3
    assert "lightning" in BLOCKS[0] and "FlatnessTrainer" in BLOCKS[1] and "opt.step(closure)" in BLOCKS[2]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=["lightning", "hf", "plain"][: len(BLOCKS)])
def test_snippet_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip(["lightning", "transformers", "tensorboard"][index])
    monkeypatch.chdir(tmp_path)  # the snippets write under runs/
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(BLOCKS[index], f"README.md ({HEADING}, block {index + 1})", "exec"), namespace)
    if "curvature" in namespace:  # Lightning: 4 updates (alternate, 2 micro-batches each); HF: 4 updates
        assert [r["step"] for r in namespace["curvature"].rows] == [2, 4]
    if "tracker" in namespace:
        assert [r["step"] for r in namespace["tracker"].rows] == [10, 20]
