"""Checkpoints: atomic writes, safe loads (``weights_only=True``), foreign state_dicts.

A flatness checkpoint is a dict of tensors and plain Python values::

    {"format": "flatness-checkpoint", "format_version": 1, "version": "0.1.0",
     "model": "cnn1d", "model_kwargs": {...}, "dataset": "mnist1d",
     "config": {...}, "state_dict": {...}, "optimizer": {...} | None,
     "scheduler": {...} | None, "rng": {...}, "epoch": int, "step": int,
     "batch_in_epoch": int, "metrics": [ {...}, ... ]}

``model`` and ``dataset`` are registry names or the user's callable specs
(``module:fn`` / ``file.py:fn``); the loss spec (``cross_entropy``, ``mse``
or ``module:fn``) and ``data_kwargs`` live in ``config`` (``loss`` may also
be a top-level key). A user's code is imported again when the checkpoint is
loaded; when it has moved, ``--model`` / ``--data`` / ``--loss`` say where.

It is only ever read with ``torch.load(weights_only=True)``, so a file that
carries a pickle payload is refused before any of it runs.

Checked checkpoints (format version 2): ``save_checkpoint`` adds
``"digest": {"algorithm": "sha256", "value": ...}``, the
:func:`~flatness.provenance.digest.content_digest` of every other key (every
tensor's bytes and every plain value, in a fixed order), and
``read_checkpoint_file`` recomputes it: a checkpoint whose digest does not
verify (a flipped bit in a weight, a momentum buffer, a setting) is refused
with :class:`CheckpointCorrupted`, as is one whose weights are not all finite.
Files without a digest (flatness 0.2 and other tools) are read with the
finiteness check only.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatness.atomic import atomic_open
from flatness.errors import FlatnessError
from flatness.hooks import is_callable_spec
from flatness.models import build_model
from flatness.provenance.digest import ALGORITHM, content_digest
from flatness.version import __version__

FORMAT = "flatness-checkpoint"
FORMAT_VERSION = 2  # 2: content digest


class CheckpointCorrupted(FlatnessError):
    """A checkpoint whose content digest does not verify, or whose weights are not all finite."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: the network, in eval mode, on the requested device.
        config: every training setting (empty for foreign files, except
            ``model`` and ``model_kwargs``).
        metrics: per-epoch metric dicts (as in ``metrics.jsonl``).
        raw: the full dict as stored (optimizer, scheduler, RNG states...).
    """

    path: Path
    model: nn.Module
    model_name: str
    model_kwargs: dict
    config: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    raw: dict = field(default_factory=dict)
    foreign: bool = False

    @property
    def epoch(self) -> int:
        return int(self.raw.get("epoch", 0))

    @property
    def step(self) -> int:
        return int(self.raw.get("step", 0))

    @property
    def dataset(self) -> str | None:
        return self.raw.get("dataset") or self.config.get("data")

    @property
    def digest(self) -> str:
        """sha256 content digest (the one written at save, verified at load; computed for foreign files)."""
        return checkpoint_digest(self.raw)

    @property
    def loss(self) -> str | None:
        """The loss spec the run trained with (``cross_entropy``, ``mse`` or ``module:fn``); None if unrecorded."""
        return self.raw.get("loss") or self.config.get("loss")


RUN_CHECKPOINTS = ("final.pt", "checkpoints/last.pt")


def resolve_checkpoint_path(path: str | Path) -> tuple[Path, Path | None]:
    """The checkpoint file that ``path`` names, and the run directory when it is one.

    Every command takes a checkpoint file or a run directory; a run directory
    stands for its ``final.pt``, else ``checkpoints/last.pt`` (a run that has
    not finished).

    Returns:
        ``(file, run_dir)``; ``run_dir`` is None when ``path`` is a file.

    Raises:
        FlatnessError: a directory holding neither file.
    """
    path = Path(path)
    if path.is_dir():
        for name in RUN_CHECKPOINTS:
            if (path / name).is_file():
                return path / name, path
        raise FlatnessError(f"run directory {path} has no {' or '.join(RUN_CHECKPOINTS)}")
    return path, None


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory a checkpoint file belongs to (``final.pt`` or ``checkpoints/*.pt`` beside a ``config.json``), if any."""
    path = Path(path)
    for folder in (path.parent, path.parent.parent):
        if (folder / "config.json").is_file():
            return folder
    return None


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + rename).

    The format header and the content digest (over every other key) are
    added here. If the write fails, the file that was at ``path`` before
    stays intact.
    """
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": __version__, **payload}
    payload.pop("digest", None)
    payload["digest"] = {"algorithm": ALGORITHM, "value": content_digest(payload)}
    with atomic_open(path, "wb") as f:
        try:
            torch.save(payload, f)
        except RuntimeError as e:
            # A failed write (disk full, file too large) surfaces as a RuntimeError from
            # torch's zip writer cleanup; the OSError behind it is what the caller handles.
            cause = e.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None


def read_checkpoint_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with user-facing errors.

    A flatness checkpoint's content digest is verified and its weights must
    be finite (see the module docstring).

    Raises:
        CheckpointCorrupted: the digest does not verify, or a weight is NaN/inf.
        FlatnessError: missing, unreadable, truncated, or carrying anything
            but tensors and plain values (e.g. a pickle payload).
    """
    path = Path(path)
    if not path.exists():
        raise FlatnessError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise FlatnessError(f"checkpoint {path} is not a file")
    _check_container(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise FlatnessError(f"checkpoint {path} was refused: it holds objects other than tensors and plain values ({_refusal(e)})") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError, AttributeError, KeyError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FlatnessError(f"checkpoint {path} cannot be read (truncated or not a checkpoint): {msg}") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        verify_digest(obj, path)
        if isinstance(obj.get("state_dict"), dict):
            check_finite(obj["state_dict"], path)
    return obj


def verify_digest(obj: dict[str, Any], path: Path) -> None:
    """Recompute a checkpoint's content digest; a file without one (older versions) passes.

    Raises:
        CheckpointCorrupted: the stored digest differs from the content's.
    """
    stored = obj.get("digest")
    if stored is None:
        return
    if not isinstance(stored, dict) or stored.get("algorithm") != ALGORITHM:
        raise CheckpointCorrupted(f"checkpoint {path} is damaged: its digest record is unreadable ({stored!r:.80})")
    actual = content_digest({k: v for k, v in obj.items() if k != "digest"})
    if actual != stored.get("value"):
        raise CheckpointCorrupted(
            f"checkpoint {path} is corrupted: its content does not match the sha256 digest written with it "
            f"({str(stored.get('value'))[:12]}... written, {actual[:12]}... now); use another checkpoint of the run"
        )


def check_finite(state: dict[str, Any], path: Path) -> None:
    """Every floating tensor of a state_dict is finite.

    Raises:
        CheckpointCorrupted: naming the first tensor with a NaN or infinite entry.
    """
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointCorrupted(f"checkpoint {path} holds non-finite weights ({name} has NaN or infinite entries); use another checkpoint")


def checkpoint_digest(obj: dict[str, Any]) -> str:
    """The content digest of a loaded checkpoint: the stored one (verified on read), else computed now."""
    stored = obj.get("digest")
    if isinstance(stored, dict) and isinstance(stored.get("value"), str):
        return stored["value"]
    return content_digest({k: v for k, v in obj.items() if k != "digest"})


# First bytes of files that are sometimes passed where a checkpoint belongs.
_MAGIC = {b"\x89HDF\r\n\x1a\n": "an HDF5 file, e.g. a surface", b"{": "a JSON file", b"[": "a JSON file", b"\x89PNG": "a PNG image", b"%PDF": "a PDF"}


def _check_container(path: Path) -> None:
    """Refuse files that are not torch.save output (zip archive, or legacy pickle) before torch.load sees them."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        raise FlatnessError(f"checkpoint {path} cannot be read: {e.strerror}") from None
    if not head:
        raise FlatnessError(f"checkpoint {path} is empty")
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            raise FlatnessError(f"checkpoint {path} cannot be read: it is truncated or damaged (its zip archive is incomplete)")
        return
    if head.startswith(b"\x80"):  # pickle protocol 2+: torch's legacy format
        return
    kind = next((what for magic, what in _MAGIC.items() if head.lstrip().startswith(magic)), None)
    raise FlatnessError(f"{path} is not a PyTorch checkpoint{f' (it looks like {kind})' if kind else ''}")


def _refusal(e: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only message that names what was refused."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line
    return lines[0] if lines else type(e).__name__


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def _foreign_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the state_dict inside a file written by another tool."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "net", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return _strip_prefix(inner)
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return _strip_prefix(obj)
    raise FlatnessError(f"{path} is neither a flatness checkpoint nor a state_dict")


def _load_weights(model: nn.Module, state: dict[str, Any], name: str, path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            detail.append(f"unexpected {', '.join(unexpected[:3])}{'...' if len(unexpected) > 3 else ''}")
        raise FlatnessError(f"checkpoint {path} does not fit model {name!r}: {'; '.join(detail)}")
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise FlatnessError(
                f"checkpoint {path} does not fit model {name!r}: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
            )
    model.load_state_dict(state)


def load_checkpoint(
    path: str | Path,
    *,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> Checkpoint:
    """Load a checkpoint (ours, or a plain state_dict from another tool).

    Args:
        path: the ``.pt`` file, or a run directory (its ``final.pt``, else
            ``checkpoints/last.pt``; see :func:`resolve_checkpoint_path`).
        model: registry name or callable spec (``module:fn`` /
            ``file.py:fn``); required for foreign state_dicts, checked
            against ours (a mismatch is an error, except that a callable spec
            may replace the recorded one when the user's code has moved).
        model_kwargs: kwargs for a foreign state_dict's model (e.g.
            ``{"num_classes": 100}``); for ours they must match the recorded ones.
        device: where the model is put.

    Returns:
        A :class:`Checkpoint` with ``.model`` in eval mode.

    Example:
        >>> ckpt = load_checkpoint("runs/sgd/final.pt")  # doctest: +SKIP
        >>> ckpt.model(x)  # doctest: +SKIP
    """
    path = resolve_checkpoint_path(path)[0]
    obj = read_checkpoint_file(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if model is None and isinstance(obj.get("model"), str):  # the user's file, found from the run directory too
            from flatness.provenance.fingerprint import locate_spec

            record = ((obj.get("fingerprint") or {}).get("code") or {}).get("model")
            located = locate_spec(obj["model"], record, run_dir_of(path))
            model = located if located != obj["model"] else None
        name, kwargs = _model_of(obj, path, model, model_kwargs)
        net = _rebuild(name, kwargs, path, recorded=name == obj.get("model"))
        _load_weights(net, obj["state_dict"], name, path)
        net.to(device).eval()
        return Checkpoint(path, net, name, kwargs, dict(obj.get("config") or {}), list(obj.get("metrics") or []), obj)
    state = _foreign_state_dict(obj, path)
    check_finite(state, path)
    if model is None:
        raise FlatnessError(f"{path} is a plain state_dict from another tool: pass --model to say which network it is")
    kwargs = dict(model_kwargs or {})
    if "num_classes" not in kwargs and not is_callable_spec(model):
        kwargs["num_classes"] = _guess_classes(state)
    net = build_model(model, **kwargs)
    _load_weights(net, state, model, path)
    net.to(device).eval()
    return Checkpoint(path, net, model, kwargs, {"model": model, "model_kwargs": kwargs}, [], {"state_dict": state}, foreign=True)


def _model_of(obj: dict[str, Any], path: Path, model: str | None, model_kwargs: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The model spec and kwargs to rebuild a flatness checkpoint with.

    A registry name given with ``--model`` must be the recorded one. For the
    user's own model, ``--model module:fn`` may name where that code lives
    now (moved or renamed); the weights must still fit it.
    """
    name = obj.get("model")
    kwargs = dict(obj.get("model_kwargs") or {})
    if model is not None and model != name:
        if not (is_callable_spec(model) and is_callable_spec(str(name))):
            raise FlatnessError(f"checkpoint {path} holds model {name!r}, but --model is {model!r}")
        name = model
    if model_kwargs and dict(model_kwargs) != kwargs:
        raise FlatnessError(f"checkpoint {path} was built with model kwargs {kwargs}, but --model-kwargs is {dict(model_kwargs)}")
    return str(name), kwargs


def _rebuild(name: str, kwargs: dict[str, Any], path: Path, *, recorded: bool) -> nn.Module:
    """``build_model``; a recorded callable spec that no longer imports says how to point at the code."""
    try:
        return build_model(name, **kwargs)
    except FlatnessError as e:
        if not (recorded and is_callable_spec(name)):
            raise
        raise FlatnessError(f"checkpoint {path} needs model {name!r}, which cannot be rebuilt ({e}); pass --model with where that code is now") from None


def _guess_classes(state: dict[str, torch.Tensor]) -> int:
    """Classifier width of a foreign state_dict: the last 2-D weight's rows."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(weights[-1].shape[0]) if weights else 10
