"""The GPT-2 encoder: the torch model (gpt2.py), its checkpoint folders (checkpoint.py), its
forward in numpy for search queries (numpy_forward.py), the fused add + LayerNorm kernel
(fused.py)."""
