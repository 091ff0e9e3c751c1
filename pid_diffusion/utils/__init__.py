"""Infrastructure the method does not depend on for its maths (as EDM keeps `torch_utils/` apart from
`training/`): processes and collectives, atomic file I/O, preemption signals, run logs, pretrained-weight
files, and speed options."""
