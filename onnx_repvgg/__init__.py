"""onnx_repvgg: fuse re-parameterizable multi-branch blocks (RepVGG and kin) in ONNX models.

    from onnx_repvgg import fuse, validate
    fused, report = fuse(onnx.load("model.onnx"))
    result = validate(original_model, fused)
"""

__version__ = "0.1.0"

from .pipeline import UnsupportedModel, fuse  # noqa: E402
from .proof.runtime import ValidationError  # noqa: E402
from .report import Report  # noqa: E402
from .validate import validate  # noqa: E402

__all__ = ["fuse", "validate", "Report", "UnsupportedModel", "ValidationError", "__version__"]
