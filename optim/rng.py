"""Noise random-number generators owned by an optimizer.

The perturbation noise of RWP-family methods (and delta-SAM's probes) is drawn
from dedicated ``torch.Generator`` objects, one per device, never from the
global generator: the data pipeline, dropout and the noise then do not disturb
each other, and the generator state can be checkpointed with the optimizer so
that a resumed run draws exactly the noise an uninterrupted run would have.
"""

from __future__ import annotations

import torch

_SEED_MOD = 2**63


class NoiseGenerators:
    """Lazily created per-device ``torch.Generator`` objects with a common seed.

    The generator of device ``d`` is seeded with ``seed + offset(d)`` where the
    offset is 0 for the CPU and ``1 + index`` for an indexed accelerator, so that
    two GPUs of one model never draw the same stream.

    Args:
        seed: base seed; ``None`` takes ``torch.initial_seed()`` (the seed given
            to ``torch.manual_seed``) without consuming any global random numbers.
    """

    def __init__(self, seed: int | None = None) -> None:
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.seed = (torch.initial_seed() if seed is None else seed) % _SEED_MOD
        self._generators: dict[str, torch.Generator] = {}

    @staticmethod
    def _key(device: torch.device) -> str:
        return str(device)

    def get(self, device: torch.device) -> torch.Generator:
        """The generator of ``device`` (created and seeded on first use)."""
        key = self._key(device)
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=device)
            offset = 0 if device.type == "cpu" else 1 + (device.index or 0)
            generator.manual_seed((self.seed + offset) % _SEED_MOD)
            self._generators[key] = generator
        return generator

    def state_dict(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "states": {key: gen.get_state() for key, gen in self._generators.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.seed = int(state["seed"])  # type: ignore[arg-type]
        self._generators = {}
        for key, gen_state in state["states"].items():  # type: ignore[union-attr]
            self.get(torch.device(key)).set_state(gen_state.cpu())
