"""fedtune server: ServerApp, strategies, checkpoints."""
