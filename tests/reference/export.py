"""Export a module with either PyTorch ONNX exporter, the way users do."""

from __future__ import annotations

import contextlib
import io
import os
import warnings

import torch


def export(model: torch.nn.Module, example: torch.Tensor, path: str, dynamo,
           dynamic_batch: bool = False, opset: int | None = None) -> str:
    """torch.onnx.export with defaults; the dynamo exporter writes external data by default.

    dynamo: False (TorchScript exporter), True, or "unoptimized" (dynamo with optimize=False,
    which leaves BN unfolded and builds conv biases at run time).
    """
    model = model.eval()
    kwargs = {}
    if dynamo == "unoptimized":
        kwargs["optimize"] = False
    if opset is not None:
        kwargs["opset_version"] = opset
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            if dynamic_batch:
                kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
            torch.onnx.export(model, (example,), path, dynamo=True, **kwargs)
        else:
            if dynamic_batch:
                kwargs["input_names"] = ["x"]
                kwargs["dynamic_axes"] = {"x": {0: "batch"}}
            torch.onnx.export(model, (example,), path, dynamo=False, **kwargs)
    assert os.path.exists(path)
    return path
