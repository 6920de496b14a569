"""hsft: Hard Sample Aware Fine-tuning of Sa2VA-style segmentation VLMs on DeepSpeed."""

__version__ = "0.1.0"
