"""sitebackup: back up a directory tree to Azure Blob Storage through a durable fan-out/fan-in."""

__version__ = "0.1.0"
