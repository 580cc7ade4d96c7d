"""still: offline knowledge distillation on Ray.

The ``still`` package holds the CLI and the plumbing every stage shares: config
loading, storage URIs, Ray start-up, MLflow tracking and the built-in datasets.
"""

__version__ = "0.1.0"
