"""Tools that bring models in: `python -m tools.gguf_to_hf` turns a GGUF file into a Hugging Face
directory that train.py --init-from loads."""
