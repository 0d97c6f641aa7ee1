"""deepseek-ptq: post-training quantization of DeepSeek-V3-family MoE models with NVIDIA modelopt."""

__version__ = "0.1.0"
