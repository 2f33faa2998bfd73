"""The durable backend seam: the embedded SQLite sidecar or Azure Durable Task Scheduler, task-hub
connection strings, the run lock and prompt worker stop. Sees ``workflows`` only through its registry."""
