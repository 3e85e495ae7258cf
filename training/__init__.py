"""Training, evaluation and promotion through MLflow."""
