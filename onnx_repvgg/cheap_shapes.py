"""Cheap shapes: tensor ranks and some dims read from a graph's structure, to rule candidates out.

onnx shape inference over a graph of 10^5 nodes costs about as much as reading the model.
Most of the shape questions the rules ask are of the kind "is this MatMul's input 2-D (so it
is a Gemm)?", and on a token model the answer "it is 3-D" is plain from the graph: the
input is the model input's rank carried through a few ops. This module reads that much,
node by node, on demand, with a small table of ops:

    same shape as input 0     unary elementwise ops, Cast, Softmax, LayerNormalization,
                              BatchNormalization, Dropout, Identity, ...
    broadcast of all inputs   Add, Sub, Mul, Div, Pow, Where, comparisons, Max, Min, Sum, Mean
    Transpose                 its perm (reversed when not given)
    MatMul, Gemm              numpy's matmul rule; Gemm's [M, N] (transA, transB)
    Conv, ConvTranspose,      the input's rank (and a Conv's output channels from its weight)
    pools, Pad, Resize, ...
    Shape, Size               [rank] (start/end applied), []
    Gather, Unsqueeze,        their rank arithmetic, with axes and targets read only from
    Squeeze, Concat,          literal constants (initializers and Constant nodes): never from
    Reshape, Flatten,         values computed from Shape nodes, so the reading is the same
    Expand, ConstantOfShape   with or without inferred shapes; a computed Reshape target
                              gives the rank (its length), not the dims

A dim is -1 when not read; None is "rank not known". Graph inputs give their declared
shapes, initializers and Constant nodes their dims; every other value is computed from its
producer (declared value_info of intermediate values is not used).

**Use: ruling out, never proving.** A rule may skip a candidate because the cheap shape makes
it impossible (a MatMul input of rank 3 is no Gemm), but any positive decision a rewrite's
soundness rests on (rank 2, a broadcast that keeps a shape, a reshape that keeps one) still
comes from onnx's shape inference (GraphView.shape). A wrong cheap answer can only lose a
fold. tests/test_cheap_shapes.py checks the reading against onnx shape inference on the
test suite's exports: wherever both know a rank or a dim, they agree.
"""

from __future__ import annotations

import numpy as np
import onnx

from .graph import GraphView, attribute

Shape = tuple[int, ...]

_SAME_AS_INPUT = frozenset({
    "Identity", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Celu", "Gelu", "Mish", "Softplus", "Softsign", "Neg", "Abs", "Sqrt", "Exp", "Log", "Erf", "Reciprocal",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not", "IsNaN", "IsInf", "Clip", "Cast", "CastLike",
    "Dropout", "Softmax", "LogSoftmax", "Hardmax", "LayerNormalization", "BatchNormalization",
    "InstanceNormalization", "GroupNormalization", "LpNormalization", "LRN", "ThresholdedRelu", "Shrink",
    "CumSum"})
_BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Where", "Equal", "Less", "LessOrEqual",
                        "Greater", "GreaterOrEqual", "And", "Or", "Xor", "BitShift", "Max", "Min", "Sum",
                        "Mean"})
_SAME_RANK = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                        "GlobalLpPool", "Pad", "Resize", "Upsample", "Tile", "Slice", "DepthToSpace",
                        "SpaceToDepth", "ConvTranspose", "Conv"})


def _broadcast(shapes: list[Shape]) -> Shape | None:
    """Multidirectional (numpy) broadcast of known ranks; a dim is read only where every input
    gives it (or gives 1)."""
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        dims = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        if any(d < 0 for d in dims):
            out.append(-1)
            continue
        big = {d for d in dims if d != 1}
        out.append(big.pop() if len(big) == 1 else (1 if not big else -1))
    return tuple(out)


RANK, DIMS = 0, 1  # what a reading is asked for: the rank (dims where they come cheap), or the dims too


class CheapShapes:
    """The cheap reading of one view's graph, made on demand and kept.

    shape(name) reads dims where it can; rank(name) reads as little as the rank needs (the
    length of a Shape's output, say, is not needed for the rank of a Gather of it), so that a
    rank question does not read the whole graph's shape arithmetic. Both readings give the
    same rank; each is a fixed function of the graph, whatever was asked before."""

    def __init__(self, view: GraphView):
        self.view = view
        self._known: tuple[dict[str, Shape | None], dict[str, Shape | None]] = ({}, {})

    @classmethod
    def of(cls, view: GraphView) -> CheapShapes:
        """The view's reader, made on first use."""
        return view.cached("cheap_shapes", lambda: cls(view))

    def rank(self, name: str) -> int | None:
        shape = self._get(name, RANK)
        return None if shape is None else len(shape)

    def shape(self, name: str) -> Shape | None:
        """The cheap shape of a value (-1 for a dim not read), or None."""
        return self._get(name, DIMS)

    def _get(self, name: str, level: int) -> Shape | None:
        known = self._known[level]
        if name in known:
            return known[name]
        path = [(name, level)]  # a depth-first walk: each value below the one that needs it
        on_path = {(name, level)}
        while path:
            top = path[-1]
            missing = self._missing(*top)
            if missing is not None and missing in on_path:
                self._known[missing[1]][missing[0]] = None  # a cycle: not a graph this reads
                continue
            if missing is not None:
                path.append(missing)
                on_path.add(missing)
                continue
            self._known[top[1]][top[0]] = self._read(*top)
            path.pop()
            on_path.discard(top)
        return known.get(name)

    # -- one value -------------------------------------------------------------------------
    def _missing(self, name: str, level: int) -> tuple[str, int] | None:
        """An input reading that reading `name` at `level` uses and that is not made yet."""
        for need in self._needs(name, level):
            if need[0] and need[0] not in self._known[need[1]]:
                return need
        return None

    def _needs(self, name: str, level: int) -> list[tuple[str, int]]:
        view = self.view
        index = view.producer.get(name)
        if index is None or view.foldable_op(index) is None or view.outputs_of[index][0] != name:
            return []
        op, inputs = view.ops[index], view.inputs_of[index]
        if op in _SAME_AS_INPUT or op in ("Transpose", "Unsqueeze", "Squeeze"):
            return [(inputs[0], level)] if inputs else []
        if op in _BROADCAST or op in ("Concat", "Gemm"):
            return [(i, level) for i in inputs]
        if op in _SAME_RANK:
            return [(inputs[0], RANK)] if inputs else []
        if op == "MatMul":
            return [(inputs[0], RANK), (inputs[1], level)] if len(inputs) > 1 else []
        if op == "Shape":
            return [(inputs[0], RANK)] if level == DIMS and inputs else []
        if op == "Gather":
            return [(inputs[0], RANK), (inputs[1], level)] if len(inputs) > 1 else []
        if op == "Reshape":  # the target's length; the data only for the dims a literal target copies (0)
            if (view.opset or 17) < 5:
                literal = list(attribute(view.nodes[index], "shape", []) or [])
                return [(inputs[0], DIMS)] if level == DIMS and 0 in literal else []
            if len(inputs) < 2:
                return []
            target = self._ints(inputs[1]) if level == DIMS else None
            return [(inputs[1], DIMS)] + ([(inputs[0], DIMS)] if target is not None and 0 in target else [])
        if op == "Expand":
            return [(inputs[0], RANK), (inputs[1], DIMS)] if len(inputs) > 1 else []
        if op == "ConstantOfShape":
            return [(inputs[0], DIMS)] if inputs else []
        return []

    def _declared(self, name: str) -> Shape | None:
        view = self.view
        if name in view.graph_inputs:
            shape = view.declared_shape(name)
            if shape is not None:
                return shape
        tensor = view.initializers.get(name)
        return tuple(tensor.dims) if tensor is not None else None

    def literal(self, name: str) -> np.ndarray | None:
        """A constant written in the model (an initializer that is no graph input, a Constant
        node, an Identity of one), never one computed: the same with or without shapes."""
        view = self.view
        for _ in range(64):
            if name in view.initializers and name not in view.graph_inputs:
                return view.constant(name)
            index = view.producer.get(name)
            if index is None:
                return None
            op = view.foldable_op(index)
            if op == "Constant":
                return view.constant(name)
            if op != "Identity":
                return None
            name = view.inputs_of[index][0]
        return None

    def _ints(self, name: str) -> list[int] | None:
        value = self.literal(name) if name else None
        if value is None or not np.issubdtype(value.dtype, np.integer):
            return None
        return [int(v) for v in value.reshape(-1)]

    def _read(self, name: str, level: int) -> Shape | None:
        view = self.view
        index = view.producer.get(name)
        if index is None:
            return self._declared(name)
        if view.foldable_op(index) is None or view.outputs_of[index][0] != name:
            return None  # a custom op, or an extra output
        op, inputs = view.ops[index], view.inputs_of[index]
        if op == "Constant":
            value = view.constant(name)
            return None if value is None else tuple(value.shape)
        at = self._known[level]
        if op in _SAME_AS_INPUT:
            return at.get(inputs[0]) if inputs else None
        if op in _BROADCAST:
            shapes = [at.get(i) for i in inputs if i]
            if not shapes or any(s is None for s in shapes):
                return None
            return _broadcast(shapes)  # type: ignore[arg-type]
        if op in _SAME_RANK:
            first = self._known[RANK].get(inputs[0]) if inputs else None
            if first is None:
                return None
            if op == "Conv" and len(inputs) > 1 and len(first) >= 2:
                weight = self._declared(inputs[1]) if inputs[1] in view.initializers else None
                channels = weight[0] if weight is not None and len(weight) == len(first) else -1
                return (first[0], channels) + (-1,) * (len(first) - 2)
            return (-1,) * len(first)
        return self._structural(op, view.nodes[index], inputs, level)

    def _structural(self, op: str, node: onnx.NodeProto, inputs: list[str], level: int) -> Shape | None:
        opset = self.view.opset or 17
        at, ranks = self._known[level], self._known[RANK]
        first = at.get(inputs[0]) if inputs and inputs[0] else None
        if op == "Transpose":
            if first is None:
                return None
            perm = attribute(node, "perm")
            perm = list(range(len(first)))[::-1] if perm is None else list(perm)
            if sorted(perm) != list(range(len(first))):
                return None
            return tuple(first[p] for p in perm)
        if op == "MatMul":
            a = ranks.get(inputs[0])
            b = at.get(inputs[1]) if len(inputs) > 1 else None
            if a is None or b is None or not a or not b:
                return None
            if len(a) == 1 and len(b) == 1:
                return ()
            if len(a) == 1:
                return b[:-2] + b[-1:]
            if len(b) == 1:
                return a[:-1]
            batch = _broadcast([a[:-2], b[:-2]]) if len(a) > 2 or len(b) > 2 else ()
            return None if batch is None else batch + (a[-2], b[-1])
        if op == "Gemm":
            b = at.get(inputs[1]) if len(inputs) > 1 else None
            if first is None or b is None or len(first) != 2 or len(b) != 2:
                return None
            m = first[1] if int(attribute(node, "transA", 0)) else first[0]
            n = b[0] if int(attribute(node, "transB", 0)) else b[1]
            return (m, n)
        if op == "Shape":
            if level == RANK:
                return (-1,)
            data = ranks.get(inputs[0]) if inputs else None
            if data is None:
                return (-1,)
            start, end = int(attribute(node, "start", 0)), attribute(node, "end", None)
            return (len(range(len(data))[slice(start, None if end is None else int(end))]),)
        if op == "Size":
            return ()
        if op == "Gather":
            data = ranks.get(inputs[0])
            indices = at.get(inputs[1]) if len(inputs) > 1 else None
            if data is None or indices is None or not data:
                return None
            axis = int(attribute(node, "axis", 0))
            axis = axis + len(data) if axis < 0 else axis
            if not 0 <= axis < len(data):
                return None
            return data[:axis] + indices + data[axis + 1:]
        if op in ("Unsqueeze", "Squeeze"):
            if first is None:
                return None
            axes = attribute(node, "axes") if opset < 13 else (self._ints(inputs[1]) if len(inputs) > 1 else None)
            if axes is None:
                return None  # Squeeze without axes drops the dims that are 1: not read here
            rank = len(first) + len(axes) if op == "Unsqueeze" else len(first) - len(axes)
            bound = rank if op == "Unsqueeze" else len(first)
            axes = sorted(a + bound if a < 0 else a for a in axes)
            if len(set(axes)) != len(axes) or any(not 0 <= a < bound for a in axes):
                return None
            if op == "Squeeze":
                return tuple(d for i, d in enumerate(first) if i not in axes)
            rest = iter(first)
            return tuple(1 if i in axes else next(rest) for i in range(rank))
        if op == "Concat":
            read = [at.get(i) for i in inputs if i]
            shapes = [s for s in read if s is not None]
            if not shapes or len(shapes) != len(read) or len({len(s) for s in shapes}) != 1 or not shapes[0]:
                return None
            rank = len(shapes[0])
            axis = int(attribute(node, "axis", 0))
            axis = axis + rank if axis < 0 else axis
            if not 0 <= axis < rank:
                return None
            dims = [s[axis] for s in shapes]
            total = sum(dims) if all(d >= 0 for d in dims) else -1
            out = _broadcast([s[:axis] + (1,) + s[axis + 1:] for s in shapes])
            return None if out is None else out[:axis] + (total,) + out[axis + 1:]
        if op == "Flatten":
            return None if self._known[RANK].get(inputs[0]) is None else (-1, -1)
        if op == "Reshape":
            if opset < 5:
                target: list[int] | None = list(attribute(node, "shape", []) or [])
                length = len(target)  # type: ignore[arg-type]
            else:
                target_shape = self._known[DIMS].get(inputs[1]) if len(inputs) > 1 else None
                if target_shape is None or len(target_shape) != 1 or target_shape[0] < 0:
                    return None
                length = target_shape[0]
                target = self._ints(inputs[1])
            if target is None or len(target) != length:
                return (-1,) * length
            allowzero = opset >= 14 and int(attribute(node, "allowzero", 0)) != 0
            data = self._known[DIMS].get(inputs[0]) if level == DIMS else None
            dims = []
            for axis, t in enumerate(target):
                if t == 0 and not allowzero:
                    dims.append(data[axis] if data is not None and axis < len(data) else -1)
                else:
                    dims.append(t if t >= 0 else -1)
            return tuple(dims)
        if op == "Expand":
            data = ranks.get(inputs[0])
            target_shape = self._known[DIMS].get(inputs[1]) if len(inputs) > 1 else None
            if data is None or target_shape is None or len(target_shape) != 1 or target_shape[0] < 0:
                return None
            return (-1,) * max(len(data), target_shape[0])
        if op == "ConstantOfShape":
            shape = self._known[DIMS].get(inputs[0]) if inputs else None
            return None if shape is None or len(shape) != 1 or shape[0] < 0 else (-1,) * shape[0]
        return None
