"""A missing optional package is one line naming the extra to install; ``import flatness`` imports none of them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

import flatness

PKG = flatness.__path__[0]


@pytest.mark.parametrize(("module", "blocked", "extra"), [
    ("lightning", "lightning.pytorch", "lightning"),
    ("hf", "transformers", "hf"),
])
def test_missing_package_names_the_extra(module: str, blocked: str, extra: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # import -> ModuleNotFoundError, as when it is not installed
    spec = importlib.util.spec_from_file_location(f"flatness_integrations_{module}_missing", f"{PKG}/integrations/{module}.py")
    with pytest.raises(ImportError) as info:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{blocked} is needed for this") and message.endswith(f"pip install 'flatness[{extra}]'")


def test_import_flatness_imports_no_integration_package() -> None:
    code = ("import sys, flatness, flatness.optim, flatness.integrations, flatness.loggers; "
            "print(sorted(m for m in ('lightning', 'transformers', 'tensorboard', 'accelerate', 'timm') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
