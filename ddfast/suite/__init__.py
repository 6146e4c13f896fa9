"""Benchmark suites: methods × data sets × sizes × seeds, evaluated under label regimes and transfer protocols,
each cell cached and resumable in its own run folder; results as a tidy table with fair scores; reports.

Entry points: ``python -m ddfast.suite run CONFIG.toml`` / ``report``; :func:`ddfast.suite.cli.main`.
Configuration format, scores and launchers: ``docs/suite.md``.
"""

from ddfast.suite.config import Cell, SuiteConfig, load_config, parse_config
from ddfast.suite.methods import METHODS, SetData, load_set, save_set
from ddfast.suite.results import collect, read_table, write_table
from ddfast.suite.runner import run_suite

__all__ = ["Cell", "SuiteConfig", "load_config", "parse_config", "METHODS", "SetData", "load_set", "save_set",
           "collect", "read_table", "write_table", "run_suite"]
