"""Batch prediction: a registered model over a parquet or CSV dataset with Ray Data."""
