"""still_cli: the ``still`` command line and ``still run`` pipelines, above every stage.

It imports the stages (``teacher_infer``, ``student_train``, ``tuning``, ``cluster``)
and nothing imports it, so the dependency reads the way it runs:
``still`` ← ``teacher_infer`` ← ``student_train`` ← ``tuning``, with the CLI on top.

- :mod:`still_cli.main`: argparse, dispatch, the summary (``still = still_cli.main:main``);
- :mod:`still_cli.verbs`: the config-driven verbs (``infer``, ``train``, ``tune``);
- :mod:`still_cli.pipeline`: ``still run PIPELINE.yaml``;
- :mod:`still_cli.config_help`: ``still VERB --help`` and ``--print-config``.
"""
