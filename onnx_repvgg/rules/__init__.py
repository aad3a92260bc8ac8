"""Pattern rules, applied in this order each round.

Each rule module exposes NAME, find(view, opset) -> Candidates (each a match or a Reason),
materialize(match, view, names) -> Rewrite, and a one-line description in its docstring.
A rule with DEFAULT = False runs only when asked for; one with LATE = True runs only once
the others have reached their fixed point.
"""

from . import bn_consumer, bn_to_conv, branch_sum

RULES = {branch_sum.NAME: branch_sum, bn_consumer.NAME: bn_consumer, bn_to_conv.NAME: bn_to_conv}
DEFAULT_RULES = [name for name, rule in RULES.items() if getattr(rule, "DEFAULT", True)]


def describe(name: str) -> str:
    doc = (RULES[name].__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


__all__ = ["RULES", "DEFAULT_RULES", "describe"]
