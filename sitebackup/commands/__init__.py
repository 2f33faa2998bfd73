"""One module per command (backup, restore, verify, manage, dry run, scale-out) and the hosting they
share: open a backend, start the worker, schedule or attach, watch status. Commands return data and
hand progress to a ``ui`` printer; ``cli`` renders the rest."""
