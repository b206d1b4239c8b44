"""Data builders: SoLoPO from MuSiQue + haystack, LongPO self-instruct, and the self-evolution loop."""
