"""Prefect tasks: thin wrappers that launch Ray work through the library and return URIs.

Dependencies point one way: flows -> tasks -> rzenembed. No ML logic lives here.
The tasks land with the orchestration work; this package reserves the layer.
"""
