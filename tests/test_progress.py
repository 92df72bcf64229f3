"""Stage lines go through ``logging``: silent for a Python caller unless it configures logging, printed on
stderr by the CLI (``progress.stage_lines``), tagged by module."""

from __future__ import annotations

import logging

from instaflow_edge import progress


def test_library_loggers_are_silent_without_a_handler(capsys):
    logging.getLogger("instaflow_edge.convert.onnx").info("unet: exporting")
    assert capsys.readouterr().err == ""


def test_stage_lines_prints_tagged_lines_and_restores_the_logger(capsys):
    root = logging.getLogger("instaflow_edge")
    before = (root.level, list(root.handlers))
    with progress.stage_lines():
        logging.getLogger("instaflow_edge.convert.onnx").info("unet: exporting")
        logging.getLogger("instaflow_edge.quantize.onnx").info("unet (1/1): int8-static")
        logging.getLogger("instaflow_edge.bench.latency").debug("not shown at INFO")
        progress.say("train", "step 3")
    err = capsys.readouterr().err.splitlines()
    assert [ln.split("]")[0].split()[0] for ln in err] == ["[onnx", "[quantize", "[train"]
    assert err[0].endswith("] unet: exporting")
    assert (root.level, list(root.handlers)) == before


def test_a_caller_silences_one_module(capsys):
    with progress.stage_lines():
        logging.getLogger("instaflow_edge.convert").setLevel(logging.WARNING)
        try:
            logging.getLogger("instaflow_edge.convert.onnx").info("hidden")
            logging.getLogger("instaflow_edge.report.build").info("shown")
        finally:
            logging.getLogger("instaflow_edge.convert").setLevel(logging.NOTSET)
    err = capsys.readouterr().err
    assert "hidden" not in err and "shown" in err


def test_tags():
    assert progress.tag("instaflow_edge.convert.openvino") == "openvino"
    assert progress.tag("instaflow_edge.quantize.onnx_folder") == "quantize"
    assert progress.tag("instaflow_edge.report.build") == "report"
    assert progress.tag("instaflow_edge.digits.judge") == "judge"
