"""The proof behind validation (onnx_repvgg.validate): what changed between two models
(changes), which tensors a float rounding change can make jump (continuity), each changed block
checked alone (blocks), the tensor comparison (compare) and onnxruntime access (runtime)."""
