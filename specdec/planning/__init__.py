"""Draft planning: which source drafts for each row, and how many tokens, every step.

  acceptance   acceptance estimates and the expected-tokens maths (pure)
  costs        measured step costs and the fixed proxy of seeded sampling (pure)
  early_stop   the in-step stop rule of a draft model's drafting
  planner      the Planner, the one place that decides
"""

from .planner import Planner

__all__ = ["Planner"]
