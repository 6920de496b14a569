"""Read a ZeRO-1/2 checkpoint's optimizer state back as whole tensors, whatever the number of ranks.

ZeRO-2 flattens each parameter group's trainable parameters into one vector, pads it, and gives each
rank one contiguous slice of it: its fp32 master weights and the AdamW moments of that slice. This
module undoes that for a checkpoint directory: it concatenates the ranks' slices of every group, drops
the padding and cuts the vector back into the named parameters (the shapes come from the model-state
file, `param_shapes`). What comes out does not depend on how many ranks wrote the checkpoint, which
is what lets a test (and a user) compare the state a resumed run loaded with the state that was saved.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["STATE_KEYS", "consolidated_state", "optimizer_files"]

# The per-parameter tensors a ZeRO AdamW checkpoint holds: fp32 master weights and the two moments.
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def optimizer_files(tag_dir: Path) -> list[Path]:
    """The per-rank ZeRO optimizer-state files of a checkpoint, in rank order."""
    files = list(Path(tag_dir).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    return sorted(files, key=lambda p: int(p.name.split("zero_pp_rank_")[1].split("_")[0]))


def consolidated_state(tag_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{parameter name: {"fp32", "exp_avg", "exp_avg_sq": full-shape float32 tensor, "step": tensor}}
    of the trainable parameters in a ZeRO-1/2 checkpoint directory written by any number of ranks."""
    tag_dir = Path(tag_dir)
    files = optimizer_files(tag_dir)
    if not files:
        raise ValueError(f"{tag_dir}: no ZeRO optimizer-state files (*zero_pp_rank_*_optim_states.pt)")
    model_states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    param_shapes = model_states["param_shapes"]
    ranks = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    for path, state in zip(files, ranks):
        if not isinstance(state["base_optimizer_state"], dict):
            raise ValueError(f"{path}: an elastic ZeRO checkpoint; only the default (rigid) layout is read")

    out: dict[str, dict[str, torch.Tensor]] = {}
    for group, shapes in enumerate(param_shapes):
        per_rank = [state["base_optimizer_state"]["state"][group] for state in ranks]
        flat = {"fp32": torch.cat([state["single_partition_of_fp32_groups"][group] for state in ranks])}
        for key in ("exp_avg", "exp_avg_sq"):
            flat[key] = torch.cat([s[key] for s in per_rank])
        # The flat vector is padded at its end only; per-parameter alignment padding (zero by default)
        # sits after each parameter and is the same in every rank's file.
        alignment = ranks[0].get("param_alignment_paddings")
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            numel = torch.Size(shape).numel()
            out[name] = {key: vector[offset:offset + numel].view(shape).float().clone() for key, vector in flat.items()}
            out[name]["step"] = per_rank[0]["step"].clone()
            offset += numel + (alignment[group][index] if alignment else 0)
        if offset > flat["fp32"].numel():
            raise ValueError(f"{tag_dir}: parameter group {group} holds {flat['fp32'].numel()} values, "
                             f"its parameters need {offset}")
    return out
