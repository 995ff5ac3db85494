"""Stage 2: density → compact architecture (method.md §4)."""

from core.compress.rule import (
    PRESET_TRIPLES,
    BudgetResult,
    RoundingPolicy,
    RuleResult,
    Triple,
    compact_triple,
    fit_to_budget,
    is_ineffective,
    round_half_up,
)

__all__ = [
    "PRESET_TRIPLES",
    "BudgetResult",
    "RoundingPolicy",
    "RuleResult",
    "Triple",
    "compact_triple",
    "fit_to_budget",
    "is_ineffective",
    "round_half_up",
]
