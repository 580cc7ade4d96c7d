"""Ray Tune sweeps over one soft-label store: ``still tune`` (see tuning.driver)."""
