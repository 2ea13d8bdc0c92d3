"""llmchat: an OpenAI-compatible chat service over a (quantized) Hugging Face causal LM."""

import os

# On ROCm, torch's flash and memory-efficient attention kernels (AOTriton) for most AMD GPUs are behind
# this switch, read when torch is imported; set here, before any import of torch, so `bin/just serve`
# gets them as the systemd units do. An operator's own value wins.
os.environ.setdefault("TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL", "1")

__version__ = "0.1.0"
