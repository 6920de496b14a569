"""The pipeline's stages, one module each, every one with the entry
`run(ctx: RunContext, cfg: <its config>, start: Path | None) -> StageResult`:

    base        stage 0, embedded default only: pre-train the tiny preset (a stand-in checkpoint)
    lora        stage 1: LoRA on the language model
    dpo         stage 2: DPO on masks
    mining      the hard set: the inference path over the training split, Dice < tau
    hsft        stage 3: fine-tune the projection and the mask decoder on the hard set
    variants    the variants beside HSFT, each a stage entry: control (HSFT's matched-compute
                control: the same fine-tuning on a random subset of the hard set's size, from the model
                HSFT started from), all_data, curriculum, anti_curriculum, loss_weighted, easy_control
    iterative   iterative HSFT beside HSFT: mining and fine-tuning, round after round
    unet        a reference beside the method: a MONAI U-Net trained from scratch on the training split
    evaluation  every model of the run on the held-out split ("eval" in the stage list)

report renders report.md from the stages' results. Shared pieces: training (StageResult, the export
around the loop, validation), objective (the
supervised objective, the frozen-feature cache), batching (samples -> model inputs and mask losses),
mask_dpo (the DPO losses).
"""
