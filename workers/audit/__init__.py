"""The audit of an adapter: measured before (the base model) and after,
decided by a policy. No Celery, SQLAlchemy or FastAPI here."""
