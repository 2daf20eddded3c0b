"""ISARA: the algorithm and the product around it (config, data, retrieval,
generation, filters, training, export, evaluation, runs, dashboard, CLI)."""

__version__ = "0.1.0"
