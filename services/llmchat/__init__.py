"""llmchat: an OpenAI-compatible chat service over a (quantized) Hugging Face causal LM."""

__version__ = "0.1.0"
