"""Every registry entry has a test: adding a target, scheme, compression, loss, preset or backend
without naming the test that exercises it fails here.

``COVERAGE`` maps each registry to ``{entry: "test_file.py::test_name"}``; the first test checks the
entries are exactly the registry's, the second that each named test exists (so the map cannot point
at nothing).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent




def _schemes():
    from instaflow_edge.quantize.schemes import all_schemes

    return [f"{s.backend}:{s.name}" for s in all_schemes(("onnx", "openvino"))]


def _coreml_compressions():
    from instaflow_edge.quantize.coreml import SCHEMES

    return SCHEMES


def _losses():
    from instaflow_edge.train.losses import DISTANCES

    return DISTANCES


def _presets():
    from instaflow_edge.presets import (
        preset_names,  # every preset, lazily registered ones too
    )

    return preset_names()


def _backends():
    """generate/eval backends that are not export formats (those are the format contract's)."""
    from instaflow_edge.runtime import backend_names, names

    return [b for b in backend_names() if b not in names()]


def _formats():
    from instaflow_edge.runtime import names

    return names()


def _prune_methods():
    from instaflow_edge.train.prune import BlockVariant, PruneMethod

    return [m.value for m in PruneMethod] + [f"blocks:{v.value}" for v in BlockVariant]


_COREML_COMPRESS = "test_coreml_compress.py::test_scheme_in_pytorch_and_in_the_package"

COVERAGE = {
    # the scheme contract (tests/contracts/test_scheme.py) is parametrized over the records themselves
    "quantization schemes (ONNX, OpenVINO)": (_schemes, None),
    "Core ML compressions": (_coreml_compressions, None),  # parametrized over the registry itself, below
    # the format contract (tests/contracts/test_format.py) is parametrized over runtime.names() itself, and
    # every convert target is a format (its test_every_convert_target_has_a_format)
    "export formats and convert targets": (_formats, None),
    "distillation losses": (_losses, {
        "l2": "test_reflow_distill.py::test_distill_loss_is_at_s0_on_z_plus_v",
        "pseudo-huber": "test_losses.py::test_pseudo_huber_by_hand",
        "lpips": "test_losses.py::test_decoded_lpips_gradient_reaches_latents",
    }),
    "presets": (_presets, {
        "tiny": "test_pipeline_io.py::test_round_trip_keeps_weights_tokenizer_and_kind",
        "sd15": "test_pipeline_io.py::test_sd15_architecture_counts_on_meta_device",
        "digits": "test_digits_preset.py::test_architecture",
    }),
    "generate backends (besides the export formats)": (_backends, {
        "torch": "test_cli.py::test_init_and_generate",
    }),
    "prune methods": (_prune_methods, {
        "blocks": "test_prune.py::test_blocks_variants",
        "channels": "test_prune.py::test_channels_narrows_by_importance",
        "blocks:small": "test_prune.py::test_blocks_variants",
        "blocks:base": "test_prune.py::test_blocks_variants",
        "blocks:mid": "test_prune.py::test_blocks_variants",
    }),
}


_SELF_PARAMETRIZED = {"Core ML compressions": (_COREML_COMPRESS, "list(cq.SCHEMES)"),
                      "export formats and convert targets": ("contracts/test_format.py::test_open_export_facts_and_generate",
                                         "_runnable()"),
                      "quantization schemes (ONNX, OpenVINO)": (
                          "contracts/test_scheme.py::test_scheme_marks_its_components_and_meets_its_gate", "_records()")}


def _covered(name: str) -> dict[str, str]:
    get, cover = COVERAGE[name]
    return cover if cover is not None else {entry: _SELF_PARAMETRIZED[name][0] for entry in get()}


@pytest.mark.parametrize("name", list(COVERAGE))
def test_every_entry_names_its_test(name):
    get, cover = COVERAGE[name]
    entries = set(get())
    if cover is None:
        # the named test is parametrized over the registry itself: it runs every entry by construction
        ref, marker = _SELF_PARAMETRIZED[name]
        assert marker in (TESTS / ref.split("::")[0]).read_text()
        return
    assert entries == set(cover), (
        f"{name}: registry has {sorted(entries)}, tests name {sorted(cover)} — add a test for the new entry "
        "and name it in tests/test_registries.py")


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


@pytest.mark.parametrize("name", list(COVERAGE))
def test_named_tests_exist(name):
    for entry, ref in _covered(name).items():
        file, func = ref.split("::")
        assert func in _test_functions(TESTS / file), f"{name}: {entry} names {ref}, which does not exist"


def test_every_preset_is_known_to_a_python_caller_that_imported_nothing_else():
    """``init(InitConfig(preset="digits"))`` works without importing ``instaflow_edge.digits`` first: the
    presets defined elsewhere are a lazy name table, not registrations made by an import."""
    import subprocess
    import sys

    code = ("import sys; from instaflow_edge.presets import get_preset, preset_names; "
            "assert 'instaflow_edge.digits' not in sys.modules; "
            "print(get_preset('digits').name, ','.join(preset_names()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["digits", "digits,sd15,tiny"]
