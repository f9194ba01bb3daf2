"""`specdec bench`: speculative decoding against baseline and Hugging Face peers, side by side.

Every method runs in one process on the same prompts, models and machine. Split by concern:

  config   the presets (headline default, --full, --quick, the real-model ones) and option validation
  methods  what runs: specdec drafters and transformers' generate, one prompt per call
  runner   load, measure forward costs, plan, execute (alternating order, Ctrl-C safe)
  metrics  the numbers of a row: speedup, tau, bound tau / (k c + 1), efficiency, spread
  report   one column definition for the CSV, the markdown table and its prose; plots
"""

from .config import PRESETS, SETTINGS, BenchConfig, all_methods, check_device, parse_int_list, specdec_methods
from .report import COLUMN_KEYS, COLUMNS, format_duration, headline, markdown_table, step_table, warmup_lines
from .runner import Bench, apply_threads

__all__ = [
    "ALL_METHODS",
    "COLUMNS",
    "COLUMN_KEYS",
    "PRESETS",
    "SETTINGS",
    "Bench",
    "BenchConfig",
    "all_methods",
    "apply_threads",
    "check_device",
    "format_duration",
    "headline",
    "markdown_table",
    "parse_int_list",
    "specdec_methods",
    "step_table",
    "warmup_lines",
]


def __getattr__(name: str):
    # ALL_METHODS follows the drafter registry (plug-ins included): read at each access.
    if name == "ALL_METHODS":
        return all_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
