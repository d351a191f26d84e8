"""Noise random-number generators owned by an optimizer.

The perturbation noise of RWP-family methods (and delta-SAM's probes) is drawn
from dedicated ``torch.Generator`` objects, one per device, never from the
global generator, so the data pipeline, dropout and the noise do not disturb
each other.

The generators are counter-based: before each perturbation the optimizer
calls :meth:`NoiseGenerators.next_draw`, which reseeds every generator with a
hash of ``(seed, stream, draw counter, device)``. The complete generator state
is therefore the three integers in :meth:`~NoiseGenerators.state_dict`, a
resumed run draws exactly the noise an uninterrupted one would, and the ranks
of the parallel two-role optimizer agree on it without communicating.
Reseeding costs microseconds and no device synchronisation.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class NoiseGenerators:
    """Per-device ``torch.Generator`` objects reseeded once per perturbation.

    Args:
        seed: base seed; ``None`` takes ``torch.initial_seed()`` (the seed given
            to ``torch.manual_seed``) without consuming global random numbers.
        stream: independent stream index (the parallel optimizer gives each
            perturbed rank its own).
    """

    def __init__(self, seed: int | None = None, stream: int = 0) -> None:
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.seed = (torch.initial_seed() if seed is None else seed) & _MASK64
        self.stream = stream
        self.counter = -1  # index of the current draw; -1 before the first
        self._generators: dict[str, torch.Generator] = {}

    def _device_seed(self, device: torch.device) -> int:
        offset = 0 if device.type == "cpu" else 1 + (device.index or 0)
        x = _splitmix64(self.seed)
        x = _splitmix64(x ^ self.stream)
        x = _splitmix64(x ^ (self.counter & _MASK64))
        return _splitmix64(x ^ offset) & _MASK63

    def next_draw(self) -> None:
        """Start the next perturbation: advance the counter and reseed."""
        self.counter += 1
        for key, generator in self._generators.items():
            generator.manual_seed(self._device_seed(torch.device(key)))

    def get(self, device: torch.device) -> torch.Generator:
        """The generator of ``device`` for the current draw."""
        key = str(device)
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._device_seed(device))
            self._generators[key] = generator
        return generator

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "stream": self.stream, "counter": self.counter}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.stream = int(state["stream"])
        self.counter = int(state["counter"])
        for key, generator in self._generators.items():
            generator.manual_seed(self._device_seed(torch.device(key)))
