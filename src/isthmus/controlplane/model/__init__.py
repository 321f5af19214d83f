"""controlplane/model."""
