"""The bundled benchmark world: scikit-learn's handwritten digits as a text-to-image task.

``preset`` (the ``digits`` base pipeline; ``presets.get_preset("digits")`` loads it on first use),
``judge`` (a digits classifier trained on the real images), ``metrics`` (FID in its feature space),
``evaluate`` (``instaflow-edge eval``) and ``demo`` (the whole recipe end to end).
"""
