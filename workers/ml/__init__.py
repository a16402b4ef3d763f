"""The unlearning engine. Importing this package must stay cheap: torch is imported
only by the modules that train or evaluate, never by `workers.ml.specs`."""
