"""The FastAPI service and the `aipic` command line."""
