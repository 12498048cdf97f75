"""The `tskd` command line."""
