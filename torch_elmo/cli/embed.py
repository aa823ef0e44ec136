"""`elmo embed`: a text file to HDF5 (the removed `allennlp elmo` command), on one process or
several (`--nproc`, torchrun)."""
from __future__ import annotations

import argparse
import os
import sys

from ..config import ElmoError
from ..device import resolve_device
from .common import add_progress_flags, argv_from_args, at_least, warnings_as_lines


def add_embed_flags(p: argparse.ArgumentParser) -> None:
    from .. import embed   # its state names (torch-heavy: only when `elmo embed` runs)
    p.add_argument("--model", default=None,
                   help="dir with options.json + weights.hdf5, or a pretrained name "
                        "(small, medium, original, original-5.5B; downloaded once, cached in "
                        "$TORCH_ELMO_CACHE or ~/.cache/torch_elmo), or hf://owner/name[@rev]"
                        "[/subfolder] (Hugging Face Hub); or --options-file + --weight-file")
    p.add_argument("--options-file", default=None,
                   help="allennlp's form: options.json (with --weight-file, instead of --model)")
    p.add_argument("--weight-file", default=None,
                   help="allennlp's form: weights.hdf5 (with --options-file)")
    p.add_argument("--input", required=True,
                   help="UTF-8 text file, one whitespace-tokenized sentence a line (dataset "
                        "'i' = line i; bytes that are not UTF-8 become U+FFFD, with a warning "
                        "naming the first file:line)")
    p.add_argument("--output", required=True, help="HDF5 file to write (atomically)")
    p.add_argument("--layers", choices=["all", "top", "average"], default="all",
                   help="all: (3, n, 2P) per line; top: layer 2; average: mean of the 3 layers")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per biLM batch")
    p.add_argument("--state", choices=list(embed.STATE_MODES), default=embed.DEFAULT_STATE,
                   help="initial LSTM state: carry = bilm-tf/allennlp (depends on batch history), "
                        "zero, warm = fixed warmed-up state (default %(default)s; README "
                        "'Inference state')")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--max-tokens", type=int, default=embed.DEFAULT_MAX_TOKENS,
                   help="longer lines are embedded in overlapping windows and rejoined "
                        "(0 = no limit; default %(default)s)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine: runs `torchrun --standalone --nproc_per_node "
                        "N -m torch_elmo embed ...` (lines dealt out across processes, one output)")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a process waits for the others (several processes only)")
    p.add_argument("--use-sentence-keys", action="store_true",
                   help="name each dataset by its line's text (lines unique and non-empty)")
    p.add_argument("--forget-sentences", action="store_true",
                   help="do not write sentence_to_index")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    add_progress_flags(p)


def cmd_embed(args) -> int:
    """The model is `--model`, or allennlp's `--options-file` + `--weight-file`;
    `--use-sentence-keys` and `--forget-sentences` as allennlp's `elmo` command."""
    from ..embed import DEFAULT_STATE, ElmoEmbedder, check_state
    from ..hub import resolve_model
    from ..outputs import check_output
    model = getattr(args, "model", None)
    options_file = getattr(args, "options_file", None)
    weight_file = getattr(args, "weight_file", None)
    if model is not None and (options_file or weight_file):
        raise ElmoError("give --model or --options-file + --weight-file, not both")
    if model is None and not (options_file and weight_file):
        raise ElmoError("give --model, or both --options-file and --weight-file")
    at_least("--batch-size", args.batch_size, 1)
    at_least("--max-tokens", args.max_tokens, 0)
    nproc = getattr(args, "nproc", None)
    at_least("--nproc", nproc, 1)
    if nproc is not None and nproc > 1:
        from .. import distributed
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ElmoError("--nproc inside torchrun: use one or the other")
        check_output(args.output, "--output", [args.input, options_file, weight_file])
        return distributed.spawn_torchrun(nproc, "embed", argv_from_args(args, add_embed_flags))
    if not os.path.isfile(args.input):
        raise ElmoError(f"--input {args.input}: " + ("is a directory, expected a text file"
                        if os.path.isdir(args.input) else "input file not found"))
    check_output(args.output, "--output", [args.input, options_file, weight_file])
    state = check_state(args.state or DEFAULT_STATE)
    from .. import distributed
    from ..embed import embed_file, embed_file_distributed
    device = resolve_device(args.device)
    rank, world_size, device = distributed.init_distributed(
        device, getattr(args, "dist_timeout", None) or 600.0)
    if world_size > 1:
        distributed.on_sigterm_say_why(rank, "embed")
        if device.type == "cpu":          # the cores are shared between this machine's ranks
            import torch
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    files = resolve_model(model) if model is not None else (options_file, weight_file)
    embedder = ElmoEmbedder(*files, state=state, device=device, max_batch_size=args.batch_size)
    kw = dict(layers=args.layers, batch_size=args.batch_size,
              forget_sentences=getattr(args, "forget_sentences", False),
              use_sentence_keys=getattr(args, "use_sentence_keys", False), dtype=args.dtype,
              max_tokens=None if args.max_tokens == 0 else args.max_tokens,
              warn=lambda msg: print(f"elmo embed: warning: {msg}", file=sys.stderr),
              progress=getattr(args, "progress", None))
    with warnings_as_lines("embed"):
        if world_size > 1:
            n = embed_file_distributed(embedder, args.input, args.output, rank, world_size, **kw)
        else:
            n = embed_file(embedder, args.input, args.output, **kw)
    if rank == 0:
        print(f"embedded {n} lines -> {args.output} ({args.layers}, {args.dtype}, state {state}"
              + (f", {world_size} processes" if world_size > 1 else "") + ")", file=sys.stderr)
    if world_size > 1:
        distributed.leave_group(rank, 0)
    return 0


COMMANDS = {
    "embed": ("embed a text file to HDF5 (the removed `allennlp elmo` command)", add_embed_flags,
              cmd_embed),
}
