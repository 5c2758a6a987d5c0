"""noisebench: does this chip's arithmetic break RL fine-tuning of LLMs?"""
__version__ = "0.1.0"
