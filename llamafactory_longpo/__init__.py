"""LongPO and SoLoPO stages for LLaMA-Factory.

Importing this package is cheap (no torch, no toolkit): the stages are registered lazily by
``_bootstrap`` when LLaMA-Factory itself is imported.
"""

__version__ = "0.1.0"
