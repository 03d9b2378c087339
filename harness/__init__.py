"""The harness that keeps runs safe and convenient: run directories, locks and interrupts, config
parsing and --help, the schedule and preflight checks, parallelism, checkpoints, logs and trackers,
corpus readers, and the sweep's plan and report. The method itself is in the top-level files."""
