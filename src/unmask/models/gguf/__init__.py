"""GGUF, llama.cpp's single-file format: reading (any supported architecture and tensor type) and writing."""

from unmask.models.gguf.read import GGUFFile, gguf_summary, is_gguf, load_gguf

__all__ = ["GGUFFile", "gguf_summary", "is_gguf", "load_gguf"]
