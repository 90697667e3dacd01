"""Multi-process JAX: distributed initialisation and the device mesh of a run."""
