"""What every exporter checks against, computed once: the PyTorch fp32 reference of each component (its
example inputs and output) and of the whole one-step image, and the runtime facts of the export.

``export_onnx`` and ``export_openvino`` both start here (load → sizes → references → facts), so the two
exporters share one skeleton; their parity rows compare each export's own runtime with these outputs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..artifacts import check_output
from ..errors import ModelError
from ..parity import Conditioning, conditioning
from ..pipeline import load_pipeline
from ..runtime.base import ExportFacts
from ..validators import prompt_file


@dataclasses.dataclass
class Reference:
    """``components``: name → (example inputs as torch tensors, fp32 output as numpy), for the names
    exported; ``ids``/``noise``/``image``: the end-to-end one-step image (numpy) for the first example
    prompt and seed 0; ``facts``: what the runtime will compute with; ``empty``: the UNet's inputs and
    output for the empty prompt, same sample (the conditioning check)."""

    components: dict[str, tuple[tuple, object]]
    input_names: dict[str, tuple[str, ...]]
    ids: object
    noise: object
    image: object
    facts: ExportFacts
    empty: dict[str, tuple[tuple, object]] = dataclasses.field(default_factory=dict)

    def feed(self, name: str, inputs: tuple | None = None) -> dict:
        """Component ``name``'s example inputs (or ``inputs``) as an ONNX-style feed (input name → numpy)."""
        inputs = self.components[name][0] if inputs is None else inputs
        return {k: x.numpy() for k, x in zip(self.input_names[name], inputs)}

    def conditioning(self, run) -> Conditioning:
        """The conditioning figures of an export's UNet: ``run(inputs)`` runs it on a tuple of example inputs
        (torch tensors, as ``components["unet"][0]``) and returns its output; it is run on the example prompt
        and on the empty prompt with the same sample, and compared with PyTorch's two outputs."""
        (inputs, out), (e_inputs, e_out) = self.components["unet"], self.empty["unet"]
        return conditioning(out, e_out, run(inputs), run(e_inputs))

    def output(self, name: str):
        return self.components[name][1]


def check_source(cfg) -> Path:
    """What an exporter refuses before loading anything: a missing or empty calibration prompts file, an
    output that overlaps an input (``--force`` never replaces one), a model path that is not a folder.
    Returns the model folder."""
    prompt_file(cfg.calibration_prompts, [], "calibration prompts")
    check_output(cfg.output, cfg.force, (cfg.model, cfg.calibration_prompts))
    src = Path(cfg.model)
    if not src.is_dir():
        raise ModelError(f"model path {src} is not a folder", "pass a local pipeline folder (instaflow-edge init / train output)")
    return src


def load_source(model: str | Path, allow_pickle: bool, height: int | None, width: int | None):
    """The source pipeline (fp32, CPU, local files only) and the sizes it is exported at."""
    from ..components import Sizes

    pipe = load_pipeline(Path(model), "cpu", "float32", allow_pickle, local_files_only=True)
    h, w = pipe.image_size(height, width)
    return pipe, Sizes.of(pipe, batch=1, height=h, width=w)


def compute(pipe, sizes, names: list[str], spec_for, fixed_size: bool = False) -> Reference:
    """The references of ``names`` (``spec_for(name)`` gives each component's export spec) and of the
    end-to-end image; ``pipe``'s modules are run once each, under no_grad."""
    import torch

    from ..components import EXAMPLE_PROMPTS
    from ..generator import OneStepGenerator, make_noise

    comps, input_names, empty = {}, {}, {}
    with torch.no_grad():
        for name in names:
            spec = spec_for(name)
            inputs = spec.example_inputs(pipe, sizes)
            comps[name] = (inputs, spec.module(pipe)(*inputs).numpy())
            input_names[name] = tuple(t.name for t in spec.inputs)
            if name == "unet":  # the conditioning check: the same sample with the empty prompt's embedding
                e_inputs = spec.example_inputs(pipe, sizes, prompts=[""])
                empty[name] = (e_inputs, spec.module(pipe)(*e_inputs).numpy())
        ids = pipe.tokenize(EXAMPLE_PROMPTS[:1])
        noise = make_noise([0], (sizes.latent_channels, sizes.latent_height, sizes.latent_width))
        image = OneStepGenerator.from_pipeline(pipe)(ids, noise)
    return Reference(comps, input_names, ids.numpy(), noise.numpy(), image.numpy(),
                     ExportFacts.of(pipe, sizes, names, fixed_size), empty)
