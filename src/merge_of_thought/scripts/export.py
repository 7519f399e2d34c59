"""``mot export``: a finished MoT run as one LoRA adapter on the original base and/or a merged model, with cards.

    mot export runs/my-mot --adapter out/adapter                 # exact adapter (total rank)
    mot export runs/my-mot --adapter out/adapter-r64 --rank 64   # SVD-truncated, error reported
    mot export runs/my-mot --merged out/merged --dtype bfloat16  # full model, sharded safetensors
    mot export runs/my-mot --adapter out/adapter --push-to-hub me/my-mot-lora --private

Reads ``mot_run.json``, the last completed round's ``merged/`` adapter and ``metrics.jsonl``: no trainer needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..export import FinishedRun, export_run
from ..hub import PLOT_FILE, PLOT_HINT, hub_id, is_local_path, push_folder
from .console import add_verbose_flag, run_command


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    """The push_to_hub options of TRL/PEFT, shared by ``mot export`` and ``mot merge``."""
    hub = parser.add_argument_group("Hub upload")
    hub.add_argument("--push-to-hub", metavar="REPO_ID", help="Upload the result to this Hub repository.")
    hub.add_argument("--private", action="store_true", default=None, help="Create the repository as private.")
    hub.add_argument("--revision", help="Branch to upload to (created if missing).")
    hub.add_argument("--token", help="Hub token (default: the one saved by `hf auth login`).")


def make_parser(prog: str | None = "mot export") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("run_dir", help="The output_dir of a MoT run.")
    parser.add_argument("--adapter", metavar="DIR", help="Write one PEFT LoRA adapter on the original base here.")
    parser.add_argument("--merged", metavar="DIR", help="Write the merged full model here.")
    parser.add_argument("--rank", type=int, help="Rank budget of the adapter (default: exact, total rank).")
    parser.add_argument("--dtype", help="dtype of the merged model (default: the base checkpoint's).")
    parser.add_argument("--max-shard-size", default="5GB", help="Largest safetensors shard of the merged model.")
    parser.add_argument("--round", type=int, help="Export this round (default: the last completed one).")
    parser.add_argument(
        "--base-model", help="Hub id to record as the base when the run loaded it from a local folder."
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow the base model's own code.")
    add_hub_arguments(parser)
    add_verbose_flag(parser)
    return parser


def push(args: argparse.Namespace, folders: list[str]) -> None:
    for folder in folders:
        info = push_folder(folder, args.push_to_hub, args.private, args.revision, args.token)
        print(f"uploaded {folder} to {getattr(info, 'commit_url', args.push_to_hub)}")


def export_notes(finished: FinishedRun, base_model_id: str | None, folders: list[str]) -> list[str]:
    """What the user can still fix about an export: a base recorded as a local path, a card without its plot."""
    notes = []
    base = hub_id(base_model_id or finished.base_model)
    if is_local_path(base):
        notes.append(
            f"the run's base model is the local folder {base}, so the export records that path as its base "
            "(base_model_name_or_path, the card), which nobody else can load. Pass --base-model <hub id> (the id "
            "the folder was downloaded from) to record the Hub id."
        )
    if any(folder and not (Path(folder) / PLOT_FILE).exists() for folder in folders):
        notes.append(f"matplotlib is not installed, so the card has no loss plot ({PLOT_FILE}): {PLOT_HINT}.")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    return run_command(lambda rest: run(parser, parser.parse_args(rest)), argv)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.adapter and not args.merged:
        parser.error("nothing to export: pass --adapter DIR and/or --merged DIR.")
    if args.push_to_hub and args.adapter and args.merged:
        parser.error("--push-to-hub uploads one folder: export --adapter or --merged, not both.")
    finished = FinishedRun(args.run_dir, args.round)
    results = export_run(
        finished,
        adapter_dir=args.adapter,
        merged_dir=args.merged,
        rank=args.rank,
        dtype=args.dtype,
        base_model_id=args.base_model,
        max_shard_size=args.max_shard_size,
        trust_remote_code=args.trust_remote_code,
        repo_id=args.push_to_hub,
    )
    if "adapter" in results:
        r = results["adapter"]
        print(
            f"adapter (round {finished.round}) -> {args.adapter}: rank {r['rank']}, relative error "
            f"{r['relative_error_total']:.3g} total, {r['relative_error_max']:.3g} worst layer"
        )
    if "merged" in results:
        print(f"merged model (round {finished.round}, {results['merged']['dtype']}) -> {args.merged}")
    for note in export_notes(finished, args.base_model, [args.adapter or "", args.merged or ""]):
        print(f"mot export: note: {note}", file=sys.stderr)
    if args.push_to_hub:
        push(args, [args.adapter or args.merged])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
