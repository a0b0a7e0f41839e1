"""An example flybox plugin: the particle step ``clip``.

Clips each particle image to ``mean ± sigma · std`` (per image, float64 statistics), a simple
outlier guard after normalisation. Registered in ``pyproject.toml``::

    [project.entry-points."flybox.processors"]
    clip = "flybox_plugin_example:ClipStep"
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from flybox.processors import ParticleProcessor, ParticleStack, StepSettings

__all__ = ["ClipSettings", "ClipStep"]


class ClipSettings(StepSettings):
    """Settings of ``clip``."""

    sigma: float = Field(default=4.0, gt=0, description="clip beyond ±sigma standard deviations")


class ClipStep(ParticleProcessor[ClipSettings]):
    """Clip every particle image to ``mean ± sigma · std``."""

    name: ClassVar[str] = "clip"
    Settings: ClassVar[type[StepSettings]] = ClipSettings

    def apply(self, stack: ParticleStack) -> ParticleStack:
        """Return the stack with its pixels clipped (float32 in, float32 out)."""
        images = stack.real()
        flat = images.reshape(len(images), -1)
        mean = flat.mean(axis=1, dtype=np.float64)
        std = flat.std(axis=1, dtype=np.float64)
        sigma = self.settings.sigma
        low = (mean - sigma * std).astype(np.float32)[:, None, None]
        high = (mean + sigma * std).astype(np.float32)[:, None, None]
        return stack.set_real(np.clip(images, low, high).astype(np.float32, copy=False))
