"""Which checkpoints a comparison pools: seeds of ONE configuration, never more (issue 21).

Two checkpoints are seeds of one configuration when everything that produced
them is equal except the seed: the resolved settings (bookkeeping such as
``--save-every`` or curvature tracking aside), the content of the user's
model / data / loss code, the training and test data, and the number of
updates done (two checkpoints of one run are two configurations, not two
seeds). Groups are formed by configuration and labelled by the method, plus
the settings that tell apart configurations of one method (``sgd (loss=mse)``).
User labels (``--labels``) may name groups, but a label that would pool two
configurations, or the same seed twice, is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flatness.errors import FlatnessError

#: Settings that do not change the weights a run reaches, so they do not tell configurations apart.
BOOKKEEPING = ("save_every", "keep_epochs", "track_curvature", "track_trace", "track_samples", "data_dir")
#: Records beside the settings (compared through their content below, or derived from the settings).
RECORDS = ("updates", "data_epochs", "grad_evals_per_update", "fingerprint", "schedule_replans")


def configuration(checkpoint: Any, path: Path, *, labelled: bool = False) -> dict[str, Any]:
    """What produced a checkpoint, minus its seed: a flat dict of comparable values.

    ``checkpoint`` is a :class:`flatness.checkpoint.Checkpoint`. Files from
    other tools record nothing: each is its own configuration, unless the user
    labels them (``labelled``), who then vouches for what they pool.
    """
    if checkpoint.foreign:
        return {"foreign model": checkpoint.model_name} if labelled else {"file": str(path)}
    config = checkpoint.config
    fingerprint = checkpoint.raw.get("fingerprint") or config.get("fingerprint") or {}
    out: dict[str, Any] = {k: v for k, v in config.items() if k not in ("seed", *BOOKKEEPING, *RECORDS)}
    for role, record in (fingerprint.get("code") or {}).items():
        if "sha256" in record:  # the user's code: its content, wherever the file lives now
            out[role] = f"{Path(record.get('file', record['spec'])).name}@{record['sha256'][:12]}"
    for split, record in (fingerprint.get("data") or {}).items():
        out[f"{split} data"] = str(record.get("sha256", ""))[:12]
    out["updates done"] = checkpoint.step
    return out


def _key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _describe(config: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k}={config.get(k)!s}" for k in keys)


def form_groups(paths: list[Path], checkpoints: list[Any], labels: list[str] | None) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """A group name per checkpoint, and per group the settings that define it.

    Returns:
        ``(names, groups)``: ``groups[name]`` = ``{"configuration": ..., "differs_by": [...], "checkpoints": [...]}``.

    Raises:
        FlatnessError: a user label pooling two configurations, or one seed twice in a group.
    """
    configs = [configuration(c, p, labelled=labels is not None) for c, p in zip(checkpoints, paths)]
    seeds = [c.config.get("seed") for c in checkpoints]
    names = list(labels) if labels is not None else _default_names(checkpoints, configs)
    groups: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        g = groups.setdefault(name, {"configuration": configs[i], "checkpoints": [], "seeds": [], "first": i})
        first = g["first"]
        if _key(configs[i]) != _key(g["configuration"]):
            diff = sorted(k for k in set(configs[i]) | set(g["configuration"]) if configs[i].get(k) != g["configuration"].get(k))
            detail = "; ".join(f"{k}: {g['configuration'].get(k)!r} vs {configs[i].get(k)!r}" for k in diff[:3])
            raise FlatnessError(
                f"group {name!r} would pool {paths[first]} and {paths[i]}, whose runs differ in more than the seed ({detail}); "
                "a group holds seeds of one configuration: give them different --labels"
            )
        if seeds[i] is not None and seeds[i] in g["seeds"]:
            other = paths[names.index(name)] if names.index(name) != i else paths[first]
            raise FlatnessError(
                f"{paths[i]} and {other} are the same configuration with the same seed {seeds[i]}; a group pools different seeds: "
                "pass one of them, or give them different --labels"
            )
        g["checkpoints"].append(str(paths[i]))
        g["seeds"].append(seeds[i])
    for g in groups.values():
        g.pop("first")
    _add_differences(groups)
    return names, groups


def _default_names(checkpoints: list[Any], configs: list[dict[str, Any]]) -> list[str]:
    """Method name per configuration; configurations sharing a method get the settings that differ appended."""
    method = [str(c.config.get("method") or c.model_name or "model") for c in checkpoints]
    names: list[str] = []
    for i, cfg in enumerate(configs):
        same_method = [configs[j] for j in range(len(configs)) if method[j] == method[i]]
        distinct = {_key(c): c for c in same_method}
        if len(distinct) == 1:
            names.append(method[i])
            continue
        keys = sorted({k for c in distinct.values() for k in set(c) | set(cfg) if c.get(k) != cfg.get(k)})
        names.append(f"{method[i]} ({_describe(cfg, keys[:3]) if keys else 'other'})")
    return names


def _add_differences(groups: dict[str, dict[str, Any]]) -> None:
    """Per group, the settings in which its configuration differs from the other groups'."""
    configs = {name: g["configuration"] for name, g in groups.items()}
    for name, g in groups.items():
        mine = configs[name]
        g["differs_by"] = sorted({k for other, c in configs.items() if other != name for k in set(c) | set(mine) if c.get(k) != mine.get(k)})
