"""Marketplace event model, simulator, importers, feature pipelines and the Feast repo."""
