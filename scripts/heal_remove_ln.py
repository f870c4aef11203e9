"""Remove the Shakespeare GPT-2's LayerNorms (``--to none`` and ``--to dyt``), heal them, and measure: docs/REMOVAL.md.

Runs the user-facing commands exactly as documented (``normswap convert ... --to none --approximate``, then
``normswap finetune ... --recipe remove-ln``), timing the fine-tuning, then judges every model on the held-out plays
(valid.txt, never trained on): next-token cross-entropy of the original, the naive (unhealed) conversion and the
healed one, and greedy generations on 20 held-out prompts side by side. Writes a JSON file and prints Markdown.

    OMP_NUM_THREADS=2 python scripts/heal_remove_ln.py --work /tmp/removal --json docs/removal_results.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "shakespeare-gpt2"
TRAIN = SHARED / "data" / "shakespeare" / "train.txt"
VALID = SHARED / "data" / "shakespeare" / "valid.txt"
RECIPES = {"none": "remove-ln", "dyt": "dyt"}


def run(cmd: list[str], threads: int) -> dict:
    """Run one normswap command (``python -m normswap ...``) with ``threads`` torch threads; returns its wall and
    CPU seconds (CPU time is what the machine gave it: on a shared machine, wall time alone says little)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print("$", " ".join(cmd), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "normswap", *cmd], check=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": cpu, "load_average_after": os.getloadavg()}


def cross_entropy(model, tokenizer, text: str, seq_len: int = 256) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over ``text`` packed into ``seq_len`` blocks, and the tokens scored."""
    import torch

    ids = tokenizer(text)["input_ids"]
    blocks = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), 8):
            x = torch.tensor(blocks[i:i + 8])
            logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].double(), -1)
            total += float(-logp.gather(-1, x[:, 1:, None]).sum())
            count += x[:, 1:].numel()
    return total / count, count


def prompts(text: str, n: int = 20) -> list[str]:
    """``n`` held-out prompts: evenly spaced lines of valid.txt with at least five words, one line each."""
    lines = [line.strip() for line in text.splitlines() if len(line.split()) >= 5]
    step = max(1, len(lines) // n)
    return [lines[i * step] for i in range(n)]


def generate(model, tokenizer, prompt: str, new_tokens: int) -> str:
    import torch

    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " / ").strip()


def measure(work: Path, targets: list[str], new_tokens: int, threads: int, previous: dict | None = None,
            healed_name: str = "{target}-healed") -> dict:
    """Cross-entropy on valid.txt and generations; figures already in ``previous`` (an earlier run's JSON for the
    same folders) are reused rather than recomputed, so the slow CPU passes run once."""
    import torch
    import transformers

    import normswap

    previous = previous or {}
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    valid = VALID.read_text(encoding="utf-8")
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    original = transformers.AutoModelForCausalLM.from_pretrained(MODEL).eval()
    if "ce_original" in previous:
        ce_orig, tokens = previous["ce_original"], previous["valid_tokens"]
    else:
        ce_orig, tokens = cross_entropy(original, tok, valid)
    results: dict = {"valid_tokens": tokens, "ce_original": ce_orig, "targets": {}}
    models = {"original": original}
    for target in targets:
        row = {}
        old = (previous.get("targets") or {}).get(target) or {}
        for stage, folder in (("naive", work / target), ("healed", work / healed_name.format(target=target))):
            if not folder.is_dir():
                continue
            if f"ce_{stage}" in old and stage == "naive":
                row["ce_naive"], row["gap_naive"] = old["ce_naive"], old["gap_naive"]
                continue
            model = normswap.load(folder)
            ce, _ = cross_entropy(model, tok, valid)
            row[f"ce_{stage}"] = ce
            row[f"gap_{stage}"] = ce - ce_orig
            if stage == "healed":
                models[target] = model
                report = folder / "finetune_report.json"
                if report.is_file():
                    rep = json.loads(report.read_text())
                    row["finetune_wall_s"] = rep["wall_time_s"]
                    row["steps"] = rep["steps"]
                    row["removal"] = rep.get("removal")
                    row["finetune_after"] = rep["after"]
        results["targets"][target] = row
    gens = []
    for i, prompt in enumerate(prompts(valid)):
        old = (previous.get("generations") or [{}] * 20)[i] if previous.get("generations") else {}
        gens.append({"prompt": prompt, **{name: old[name] if name in old else generate(m, tok, prompt, new_tokens)
                                          for name, m in models.items()}})
    results["generations"] = gens
    return results


def markdown(results: dict) -> str:
    lines = ["| target | naive CE gap (nats) | healed CE gap (nats) | fine-tuning wall time |", "|---|---|---|---|"]
    for target, row in results["targets"].items():
        wall = f"{row['finetune_wall_s'] / 60:.1f} min ({row['steps']} steps)" if "finetune_wall_s" in row else "-"
        naive = f"{row['gap_naive']:+.4f}" if "gap_naive" in row else "-"
        healed = f"{row['gap_healed']:+.4f}" if "gap_healed" in row else "-"
        lines.append(f"| {target} | {naive} | {healed} | {wall} |")
    lines += ["", f"Original cross-entropy on valid.txt: {results['ce_original']:.4f} nats/token "
              f"({results['valid_tokens']} tokens scored).", ""]
    names = [k for k in results["generations"][0] if k != "prompt"] if results["generations"] else []
    lines += ["| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for g in results["generations"]:
        cells = [g["prompt"]] + [g[n] for n in names]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/normswap-removal"), help="folder for every output")
    ap.add_argument("--targets", nargs="+", default=["none", "dyt"], choices=["none", "dyt"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the fine-tuning (default 2)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override for finetune")
    ap.add_argument("--measure-only", action="store_true", help="skip convert/finetune; measure existing outputs")
    ap.add_argument("--resume", action="store_true", help="continue a killed fine-tuning run")
    ap.add_argument("--new-tokens", type=int, default=24, help="greedy tokens generated per prompt")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--previous", type=Path, help="an earlier results JSON whose figures are reused")
    ap.add_argument("--healed-name", default="{target}-healed", help="healed folder name under --work to measure")
    args = ap.parse_args()
    if not MODEL.is_dir():
        print(f"needs {MODEL} (the shared folder)", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    walls = {}
    if not args.measure_only:
        for target in args.targets:
            naive, healed = args.work / target, args.work / args.healed_name.format(target=target)
            if not naive.is_dir():
                run(["convert", str(MODEL), "-o", str(naive), "--to", target, "--approximate"], args.threads)
            cmd = ["finetune", str(naive), "--teacher", str(MODEL), "--recipe", RECIPES[target], "--text-file",
                   str(TRAIN), "--eval-text-file", str(VALID), "-o", str(healed), "--force"]
            cmd += [f"--set={o}" for o in args.overrides] + (["--resume"] if args.resume else [])
            walls[target] = run(cmd, args.threads)
    previous = json.loads(args.previous.read_text()) if args.previous else None
    results = measure(args.work, args.targets, args.new_tokens, args.threads, previous, args.healed_name)
    results["commands"] = walls
    results["load_average_at_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
