"""rzenembed: train universal multimodal embedding models with the RzenEmbed recipe."""

__version__ = "0.1.0"
