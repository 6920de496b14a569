"""The pipeline's stages: base (embedded default only), lora, dpo, mining, hsft."""
