"""Prefect flows: data-prep, train-stage, soup, evaluate, full-pipeline, retrain.

The flows land with the orchestration work; this package reserves the layer.
"""
