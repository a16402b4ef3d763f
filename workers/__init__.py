"""Execution side: Celery tasks, the job pipeline and the unlearning engine (workers.ml)."""
