"""Training: typed YAML configs, the optimizer and trainable-parameter masks, the pure train step,
the device mesh and shardings, the initial state, Orbax checkpoints, telemetry, and the run loop."""
