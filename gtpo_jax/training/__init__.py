"""The RL trainer: state, jitted update, rollout collection, checkpoints, metrics, the loop."""
