"""cmdtool: Correlation Mode Decomposition of neural-network training runs."""

__version__ = "0.1.0"
