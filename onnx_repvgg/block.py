"""What a rule hands to the rewriter: a matched Block, or a Reason it was not one."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx


@dataclass(frozen=True)
class Reason:
    """Why a candidate block was left as it is: a stable code and a message for people."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class Term:
    """One branch as an affine conv on the block's kernel grid (float64)."""

    kernel: np.ndarray       # (Cout, Cin/groups, k1, ..., kn), any float dtype
    bias: np.ndarray         # (Cout,)
    offsets: tuple[int, ...]  # where the kernel's first tap sits in the fused grid
    scale: np.ndarray | None = None  # per-output-channel factor of kernel and bias; None = 1


@dataclass
class ConvGeometry:
    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]    # ONNX order: all begins, then all ends
    group: int


@dataclass
class Block:
    """Parallel linear branches of one input, summed, to be replaced by one Conv."""

    anchor: str                   # name of the root Add node
    root_output: str              # the tensor the block's sum writes
    input: str                    # the shared input X
    terms: list[Term]
    geometry: ConvGeometry
    dtype: np.dtype
    removed_nodes: list[int]      # node indices the fused Conv replaces
    other_leaves: list[str] = field(default_factory=list)  # addends that stay in the sum
    other_scales: list[np.ndarray | None] = field(default_factory=list)  # their factor (broadcast form), if any
    name_hint: str = ""           # the main Conv's name: it is removed, so the fused Conv takes it
    constant_bias: np.ndarray | None = None  # per-channel constants summed into the bias (float64)


@dataclass
class Rewrite:
    """A match made concrete: which nodes go, which come in (and where), new initializers."""

    removed_nodes: list[int]
    insertions: list[tuple[int, list[onnx.NodeProto]]]  # (index of an old node, nodes placed before it)
    initializers: list[tuple[str, np.ndarray]]  # (name, values) of new initializers
    fused_node: str


@dataclass
class Candidate:
    """A structure that looked like a block; `block` or `reason` is set."""

    anchor: str
    branch_labels: list[str]
    block: object | None = None   # the rule's match (a Block for branch_sum); has removed_nodes
    reason: Reason | None = None
    group: int | None = None
    strides: tuple[int, ...] | None = None
    # A structure a user should look at when it is not fused: two or more branches of one tensor,
    # or a BatchNormalization. False for a single-branch fold that does not apply (a scale on a
    # conv output that something else also reads). None: the rule's NEAR_MISS (default True).
    near_miss: bool | None = None
