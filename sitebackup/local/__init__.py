"""The local file system: walking a source tree, filters, incremental decisions, file hashing, and
writing files under a restore destination. Imports nothing from the other layers but ``errors``."""
