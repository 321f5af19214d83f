"""controlplane/config."""
