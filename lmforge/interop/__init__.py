"""Weights in and out: Hugging Face folders and llama.cpp GGUF files."""
