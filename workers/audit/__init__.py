"""The audit of an adapter: measured before (base model or previous version) and after,
decided by a policy. No Celery, SQLAlchemy or FastAPI here."""
