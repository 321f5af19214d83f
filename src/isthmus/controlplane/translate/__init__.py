"""controlplane/translate."""
