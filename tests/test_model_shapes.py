"""Model shapes seen in the wild: several inputs and outputs, integer inputs, every opset,
colliding names, dynamic dims."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from onnx_repvgg import fuse, validate
from tests.graphs import GraphBuilder, fuse_and_compare, op_counts
from tests.test_branch_sum import repvgg_block

NEWEST = onnx.defs.onnx_opset_version()


def test_several_inputs_outputs_and_an_integer_input():
    b = GraphBuilder()
    first = repvgg_block(b, identity="bn")
    b.x = "y"
    second = repvgg_block(b, identity="bare")
    b.x = "x"
    b.extra_inputs += [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4, 6, 6]),
                       helper.make_tensor_value_info("idx", onnx.TensorProto.INT64, [3])]
    picked = b.op("Gather", [first, "idx"], axis=1)
    model = b.model([picked, second, first])
    fused, report = fuse(model)
    onnx.checker.check_model(fused, full_check=True)
    assert len(report.fused) == 2
    assert [o.name for o in fused.graph.output] == [picked, second, first]
    assert [i.name for i in fused.graph.input] == ["x", "y", "idx"]
    result = validate(model, fused, input_sets=3)
    assert result.passed and len(result.outputs) == 3


@pytest.mark.parametrize("opset", list(range(9, NEWEST + 1)))
def test_every_opset(opset):
    b = GraphBuilder(opset=opset)
    model = b.model([repvgg_block(b, identity="bn")])
    fused, report = fuse(model)
    onnx.checker.check_model(fused, full_check=True)
    assert op_counts(fused) == {"Conv": 1}
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        return  # the structural checks above ran; this onnxruntime does not run this opset yet
    assert validate(model, fused).passed


def test_generated_names_never_collide():
    b = GraphBuilder()
    out = repvgg_block(b, identity="bn")
    model = b.model([out])
    main_conv = model.graph.node[0].name
    # occupy the names the pass would pick, as an unused initializer and a value
    taken = [f"{main_conv}.fused_weight", f"{main_conv}.fused_bias"]
    for name in taken:
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.float32), name))
    fused, report = fuse_and_compare(model)
    names = [t.name for t in fused.graph.initializer]
    assert len(names) == len(set(names))
    conv = next(n for n in fused.graph.node if n.op_type == "Conv")
    assert conv.input[1] not in taken and conv.input[2] not in taken


def test_dynamic_batch_and_spatial_dims():
    b = GraphBuilder()
    model = b.model([repvgg_block(b, identity="bn")], input_shape=["N", 4, "H", "W"])
    fused, _ = fuse(model)
    dims = [d.dim_param for d in fused.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", "", "H", "W"]
    assert validate(model, fused, input_shapes={"x": [3, 4, 11, 5]}).passed
