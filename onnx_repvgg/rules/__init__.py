"""Pattern rules. Each rule module exposes NAME and find(view) -> list[Candidate]."""

from . import branch_sum

RULES = {branch_sum.NAME: branch_sum}

__all__ = ["RULES"]
