"""One module per command (backup, restore, verify, prune, status, list, resume, cancel, purge, worker,
serve), each owning its click definition, its request and its use case; ``options`` holds the options they
share, ``hosting`` what running and watching a run takes. Commands return data and hand progress to a
``ui`` printer; ``cli`` assembles them into the group."""
