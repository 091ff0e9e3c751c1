"""The machinery of a training run around the method (EDM keeps its loop in `training/` too): the flat loop
with its optimizer, learning-rate schedule and EMAs (train, schedule, phema); the run folder's files and resuming
from them (checkpoint, resume, launch, disk_plan); what a run records (run_log, plots); and post-hoc EMA over its
snapshots (posthoc_ema). It knows the method only through the `Objective` a task hands the loop."""
