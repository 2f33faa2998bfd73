"""The durable workflows: backup and restore orchestrations (deterministic: no I/O, no clocks), their
activities (all the I/O), block ranges, the shared page window, and the registry that puts every
orchestration and activity on a worker. Sees only ``blob`` and ``local`` below it."""
