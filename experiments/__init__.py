"""Experiments, one file each; `jaxeff.experiment.load_all()` imports them so they register."""
