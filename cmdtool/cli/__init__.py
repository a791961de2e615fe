"""The ``cmdtool`` command line (:mod:`~cmdtool.cli.app`); importing this package
registers every command."""

# registration order is the order of `cmdtool --help`: the data flow
from cmdtool.cli import store_commands  # isort: skip
from cmdtool.cli import model_commands  # isort: skip
from cmdtool.cli import eval_commands  # isort: skip
from cmdtool.cli import compare_commands  # isort: skip
from cmdtool.cli.app import app, main

__all__ = ["app", "compare_commands", "eval_commands", "main", "model_commands", "store_commands"]
