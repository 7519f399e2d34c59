"""``mot merge``: weighted merging of LoRA adapters trained on the same base into one adapter or a merged model.

    mot merge ./math-lora ./code-lora --out merged-lora                      # exact weighted mean (rank r1 + r2)
    mot merge org/a org/b --weights 0.7 0.3 --rank 32 --out merged-lora      # SVD-compressed, error reported
    mot merge a b c --method ties --density 0.5 --rank 64 --out ties-lora    # PEFT's TIES on the dense deltas
    mot merge a b --into-base --dtype bfloat16 --out merged-model            # folded into the base model

"linear" is the exact weighted mean sum_i w_i B_i A_i (weights normalized to sum to 1 unless --no-normalize);
unlike PEFT's add_weighted_adapter(combination_type="linear") it has no cross terms B_i A_j. Adapters are read
from safetensors only (--allow-pickle for a trusted adapter_model.bin).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import combine, export, hub
from .console import add_verbose_flag, run_command
from .export import add_hub_arguments, push


def make_parser(prog: str | None = "mot merge") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER", help="Local adapter folders or Hub ids.")
    parser.add_argument("--out", required=True, metavar="DIR", help="Output folder.")
    parser.add_argument("--weights", type=float, nargs="+", help="One weight per adapter (default: uniform).")
    parser.add_argument("--no-normalize", action="store_true", help="Use the weights as given (task arithmetic).")
    parser.add_argument("--method", choices=combine.METHODS, default="linear", help="How to combine the deltas.")
    parser.add_argument("--density", type=float, help="Fraction of entries kept (ties, dare_*, magnitude_prune).")
    parser.add_argument("--majority-sign-method", choices=("total", "frequency"), default="total")
    parser.add_argument("--seed", type=int, default=0, help="Seed of DARE's random pruning.")
    parser.add_argument(
        "--rank", type=int, help="Rank of the output adapter (default: exact for linear, sum of input ranks else)."
    )
    parser.add_argument("--into-base", action="store_true", help="Fold the merge into the base model instead.")
    parser.add_argument("--base-model", help="Base model to fold into (default: the adapters' base_model).")
    parser.add_argument("--dtype", help="dtype of the merged model (default: the base checkpoint's).")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--allow-different-base", action="store_true", help="Merge adapters naming other bases.")
    parser.add_argument("--allow-pickle", action="store_true", help="Read adapter_model.bin (pickle) adapters.")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow the base model's own code.")
    add_hub_arguments(parser)
    add_verbose_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    return run_command(lambda rest: run(parser, parser.parse_args(rest)), argv)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.method != "linear" and args.density is None:
        parser.error(f"--method {args.method} needs --density (the fraction of each delta's entries to keep).")
    loaded = [combine.load(source, args.allow_pickle, args.token) for source in args.adapters]
    base = combine.check_compatible(loaded, args.allow_different_base)
    weights = combine.normalized(args.weights, len(loaded), normalize=not args.no_normalize)
    if args.method == "linear":
        deltas = combine.merge_linear(loaded, weights)
    else:
        torch.manual_seed(args.seed)
        deltas = combine.merge_dense(loaded, weights, args.method, args.density, args.majority_sign_method)
    out = Path(args.out)
    info = {"sources": args.adapters, "weights": weights, "method": args.method, "density": args.density}
    if args.into_base:
        base_model = args.base_model or base
        if not base_model:
            parser.error("the adapters name no base model: pass --base-model to fold into.")
        model = export.save_merged(
            deltas,
            out,
            base_model,
            args.dtype,
            max_shard_size=args.max_shard_size,
            trust_remote_code=args.trust_remote_code,
            extra=info,
        )
        summary, kind = {"dtype": str(model.dtype).removeprefix("torch.")}, "merged"
        print(f"merged {len(loaded)} adapters ({args.method}) into {base_model} -> {out} ({summary['dtype']})")
    else:
        if args.method == "linear":
            summary = export.save_adapter(deltas, out, args.base_model or base, args.rank, extra=info)
        else:
            ranks = {name: sum(a.deltas[name].rank for a in loaded if name in a.deltas) for name in deltas}
            low_rank, reports = combine.to_low_rank(deltas, args.rank or ranks)
            summary = export.write_adapter(low_rank, reports, out, args.base_model or base, extra=info)
        kind = "adapter"
        print(
            f"merged {len(loaded)} adapters ({args.method}) -> {out}: rank {summary['rank']}, relative error "
            f"{summary['relative_error_total']:.3g} total, {summary['relative_error_max']:.3g} worst layer"
        )
    card = hub.merge_card(
        kind, out, args.adapters, weights, args.method, args.base_model or base, summary, args.push_to_hub
    )
    card.save(out / "README.md")
    if args.push_to_hub:
        push(args, [str(out)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
