"""MMEB-style evaluation of embedding models (retrieval scoring of evaluation sets)."""
