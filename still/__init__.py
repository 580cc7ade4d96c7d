"""still: offline knowledge distillation on Ray.

The ``still`` package is the ground floor every stage imports: config loading,
storage URIs, Ray start-up, MLflow tracking, the datasets and the model families. It
imports none of the stages; the command line that drives them is ``still_cli``.
"""

__version__ = "0.1.0"
