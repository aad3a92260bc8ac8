"""Pattern rules, applied in this order each round.

Each rule module exposes NAME, find(view, opset) -> list[Candidate] (each a match or a
Reason) and materialize(match, view, names) -> Rewrite.
"""

from . import bn_consumer, branch_sum

RULES = {branch_sum.NAME: branch_sum, bn_consumer.NAME: bn_consumer}

__all__ = ["RULES"]
