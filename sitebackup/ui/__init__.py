"""Output for people and scripts: progress printers (rich bar, plain lines, NDJSON), the status report and
runs table, the log file. Fed data by ``cli`` and ``commands``; imports nothing of the layers below."""
