"""controlplane/xds."""
