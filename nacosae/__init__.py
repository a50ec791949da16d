"""nacosae: Naming Concepts of Sparse AutoEncoders for vision models."""

__version__ = "0.1.0"
