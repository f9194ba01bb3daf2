"""`specdec bench`: speculative decoding against baseline and Hugging Face peers, side by side.

Every method runs in one process on the same prompts, models and machine. Split by concern:

  config   the presets (headline default, --full, --quick) and option validation
  methods  what runs: specdec drafters and transformers' generate, one prompt per call
  runner   load, measure forward costs, plan, execute (alternating order, Ctrl-C safe)
  metrics  the numbers of a row: speedup, tau, bound tau / (k c + 1), efficiency, spread
  report   one column definition for the CSV, the markdown table and its prose; plots
"""

from .config import ALL_METHODS, PRESETS, SETTINGS, BenchConfig, check_device, parse_int_list
from .report import COLUMN_KEYS, COLUMNS, format_duration, headline, markdown_table, step_table
from .runner import Bench, apply_threads

__all__ = [
    "ALL_METHODS",
    "COLUMNS",
    "COLUMN_KEYS",
    "PRESETS",
    "SETTINGS",
    "Bench",
    "BenchConfig",
    "apply_threads",
    "check_device",
    "format_duration",
    "headline",
    "markdown_table",
    "parse_int_list",
    "step_table",
]
