"""A data-parallel batch pipeline for images: a YAML stage DAG run on Dask."""

__version__ = "0.1.0"
