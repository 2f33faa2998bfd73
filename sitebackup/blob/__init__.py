"""The blob service: one client factory (sync and async, one credential order), error classification
and redaction, naming rules, uploads and the work store. Knows nothing of durable orchestration."""
