"""controlplane/ca."""
