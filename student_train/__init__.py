"""Student training: KD losses, the Ray Train worker loop, the driver, export.

Entry points: ``student_train.driver.run_train(cfg)`` (``still train``) and
``student_train.driver.train_job(cfg, run_name=..., ...)`` (what Tune trials call).
"""
