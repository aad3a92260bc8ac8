"""The node(s) that replace a Conv, Gemm or MatMul once an affine map of its input is folded
into its weight and bias (bn_into_consumer, affine_into_consumer).

    Conv, Gemm -> a copy reading (x, W', b'); a Gemm's beta dropped (b' holds beta * C)
    MatMul     -> MatMul(x, W')                without a bias
               -> Gemm(x, W', b')             with a bias, when x is 2-D (as_gemm)
               -> MatMul(x, W') -> Add(b')    with a bias otherwise
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper


@dataclass(frozen=True)
class NewNames:
    node: str               # the consumer's new name
    weight: str
    bias: str               # "" when the consumer gets no bias
    product: str = ""       # MatMul -> Add: the MatMul's output
    bias_node: str = ""     # MatMul -> Add: the Add's name


def rewritten_consumer(node: onnx.NodeProto, x: str, names: NewNames, as_gemm: bool,
                       gemm_attributes: dict | None = None) -> list[onnx.NodeProto]:
    """`node` reading x through the new weight (and bias), as described above."""
    if node.op_type == "MatMul":
        if not names.bias:
            return [helper.make_node("MatMul", [x, names.weight], list(node.output), name=names.node)]
        if as_gemm:
            return [helper.make_node("Gemm", [x, names.weight, names.bias], list(node.output), name=names.node,
                                     **(gemm_attributes or {}))]
        return [helper.make_node("MatMul", [x, names.weight], [names.product], name=names.node),
                helper.make_node("Add", [names.product, names.bias], list(node.output), name=names.bias_node)]
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = names.node
    del copy.input[:]
    copy.input.extend([x, names.weight] + ([names.bias] if names.bias else []))
    if node.op_type == "Gemm":
        for attr in list(copy.attribute):
            if attr.name == "beta":
                copy.attribute.remove(attr)
    return [copy]
