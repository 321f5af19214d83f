"""Config store and its sources (watched directory, control-plane API)."""
