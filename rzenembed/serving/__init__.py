"""Serving the registered model: an OpenAI-shaped embeddings endpoint on Ray Serve that
follows a registry alias (``rzenembed serve``)."""
