"""Run a released Sa2VA checkpoint through the release's OWN inference code, for the agreement check
(hsft.model.release.agreement).

This file is run as a script, in a separate process, by the Python of an environment where the
release's remote code runs (it was written for transformers 4.x, hsft runs on 5.x). It imports
nothing from hsft: only the standard library, numpy, PIL, torch, transformers and the release's
code, which it imports from the user's directory (hsft ships none of it).

For each image it calls the release's `predict_forward(image=..., text=..., tokenizer=...)` and
records what that returns (the decoded text, the mask at the image's size) and, by observing
without changing anything, the generated token ids (a wrapper around the model's `generate`) and
the mask decoder's [SEG] prompt (a forward hook on `text_hidden_fcs`). Results go to one .npz file.

On the CPU, two shims make the release's CUDA-only lines run, without editing its files:
`Tensor.cuda()` returns the tensor itself, and the SAM2 video predictor's inference state names the
CPU as its device (the release's init_state hard-codes "cuda").

    python release_runner.py --code DIR --checkpoint DIR --prompt TEXT --max-new-tokens N \
        --out results.npz IMAGE [IMAGE ...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from pathlib import Path

PACKAGE = "sa2va_release_code"


def import_release(code_dir: Path):
    """The release's modeling module, imported as a package from `code_dir` (its files use
    relative imports)."""
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(code_dir)]
    sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.modeling_sa2va_chat")


def install_cpu_shims() -> list[str]:
    """Make the release's hard-coded CUDA calls run on the CPU; returns what was changed."""
    import torch

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    predictor = importlib.import_module(f"{PACKAGE}.sam2").SAM2VideoPredictor
    original = predictor.init_state

    def init_state_on_cpu(self, images):
        state = original(self, images)
        state["device"] = state["storage_device"] = torch.device("cpu")
        return state

    predictor.init_state = init_state_on_cpu
    return ["Tensor.cuda() returns the tensor itself",
            "SAM2VideoPredictor.init_state: device and storage_device are the CPU"]


def run(code_dir: Path, checkpoint: Path, images: list[Path], prompt: str, max_new_tokens: int, out: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoTokenizer

    modeling = import_release(code_dir)
    shims = install_cpu_shims()
    model, info = modeling.Sa2VAChatModel.from_pretrained(checkpoint, torch_dtype=torch.float32,
                                                          output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if "rotary_emb" not in k]
    if missing:
        raise SystemExit(f"{checkpoint}: the release's model has {len(missing)} tensor(s) the checkpoint lacks, "
                         f"e.g. {missing[0]}")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model.preparing_for_generation(tokenizer, max_new_tokens=max_new_tokens, torch_dtype=torch.float32)

    prompts: list = []
    model.text_hidden_fcs.register_forward_hook(lambda module, args, output: prompts.append(output.detach()))
    sequences: list = []
    generate = model.generate

    def observed_generate(*args, **kwargs):
        result = generate(*args, **kwargs)
        sequences.append(result.sequences[0].tolist())
        return result

    model.generate = observed_generate
    arrays, meta = {}, []
    with torch.no_grad():
        for k, path in enumerate(images):
            image = Image.open(path).convert("RGB")
            prompts.clear()
            sequences.clear()
            result = model.predict_forward(image=image, text=prompt, tokenizer=tokenizer)
            tiles = modeling.dynamic_preprocess(image, model.min_dynamic_patch, model.max_dynamic_patch,
                                                model.image_size, model.use_thumbnail)
            masks = result["prediction_masks"]
            if masks:
                arrays[f"mask_{k}"] = np.asarray(masks[0][0], dtype=bool)
                arrays[f"prompt_{k}"] = prompts[0][0].float().numpy()
            arrays[f"ids_{k}"] = np.asarray(sequences[0], dtype=np.int64)
            meta.append({"image": str(path), "text": result["prediction"], "tiles": len(tiles),
                         "width": image.width, "height": image.height, "has_mask": bool(masks)})
    import transformers
    arrays["meta"] = np.asarray(json.dumps({"images": meta, "shims": shims, "torch": torch.__version__,
                                            "transformers": transformers.__version__}))
    np.savez(out, **arrays)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="release_runner.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--code", required=True, type=Path)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    run(args.code, args.checkpoint, args.images, args.prompt, args.max_new_tokens, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
