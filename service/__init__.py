"""The unlearning service's gateway: HTTP API, domain, persistence. Never imports torch."""
