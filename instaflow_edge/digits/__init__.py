"""The bundled benchmark world: scikit-learn's handwritten digits as a text-to-image task.

``preset`` (the ``digits`` base pipeline, registered with the presets when this package is imported),
``judge`` (a digits classifier trained on the real images), ``metrics`` (FID in its feature space),
``evaluate`` (``instaflow-edge eval``) and ``demo`` (the whole recipe end to end).
"""

from . import preset as _preset  # noqa: F401  (registers the "digits" preset)
