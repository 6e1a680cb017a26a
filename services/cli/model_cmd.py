"""``lscale model``: create tiny checkpoints and manage the local model store.

    lscale model create-tiny DIR [--arch llama] [--layers 2] [--hidden 64] ... [--size-mb N]
    lscale model add NAME DIR [--blocks B] [--replace] [--no-progress] [--store DIR]
    lscale model ls [--json] [--store DIR]
    lscale model rm NAME [--store DIR]
    lscale model verify NAME [--store DIR]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

_SHAPE_OPTIONS = ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab")


def register(subparsers: Any) -> None:
    model = subparsers.add_parser("model", help="create tiny checkpoints; add/list/remove models")
    sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    tiny = sub.add_parser("create-tiny", help="write a random-weight HF checkpoint")
    tiny.add_argument("directory", metavar="DIR")
    tiny.add_argument("--arch", default="llama", choices=("llama", "qwen2", "mistral"))
    tiny.add_argument("--layers", type=int, help="decoder layers (default 2)")
    tiny.add_argument("--hidden", type=int, help="hidden size (default 64)")
    tiny.add_argument("--heads", type=int, help="attention heads (default 4)")
    tiny.add_argument("--kv-heads", type=int, help="key/value heads (default 2)")
    tiny.add_argument("--intermediate", type=int, help="MLP width (default 128)")
    tiny.add_argument("--vocab", type=int, help="vocabulary size (default 512)")
    tiny.add_argument("--tied", action="store_true", help="tie LM head to the embeddings")
    tiny.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                      help="weight dtype (default float32; bfloat16 with --size-mb)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--size-mb", type=float,
                      help="pick a shape of about this many MB (excludes the shape options)")
    tiny.add_argument("--shards", type=int, default=1,
                      help="split the weights into N safetensors files with an index")
    tiny.set_defaults(func=_create_tiny)

    add = sub.add_parser("add", help="ingest a HF checkpoint directory into the store")
    add.add_argument("name", metavar="NAME")
    add.add_argument("directory", metavar="DIR")
    add.add_argument("--blocks", type=int, help="number of blocks (default min(layers, 8))")
    add.add_argument("--replace", action="store_true", help="replace a model of that name")
    add.add_argument("--no-progress", action="store_true", help="no progress bar")
    _store_option(add)
    add.set_defaults(func=_add)

    ls = sub.add_parser("ls", help="list models in the store")
    ls.add_argument("--json", action="store_true", help="print JSON")
    _store_option(ls)
    ls.set_defaults(func=_ls)

    rm = sub.add_parser("rm", help="remove a model from the store")
    rm.add_argument("name", metavar="NAME")
    _store_option(rm)
    rm.set_defaults(func=_rm)

    verify = sub.add_parser("verify", help="check every block of a model against its checksum")
    verify.add_argument("name", metavar="NAME")
    _store_option(verify)
    verify.set_defaults(func=_verify)


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="DIR",
                        help="store directory (default $LSCALE_STATE_DIR/models, "
                             "LSCALE_STATE_DIR defaulting to .lscale)")


def _create_tiny(args: argparse.Namespace) -> int:
    from shared.errors import InvalidParameter
    from shared.model.tiny import TinySpec, create_tiny, spec_for_size

    if args.size_mb is not None:
        given = [f"--{o.replace('_', '-')}" for o in _SHAPE_OPTIONS
                 if getattr(args, o) is not None]
        if given:
            raise InvalidParameter(f"--size-mb picks the shape; drop {', '.join(given)}")
        spec = spec_for_size(args.size_mb, architecture=args.arch, dtype=args.dtype or "bfloat16",
                             tie_word_embeddings=args.tied, seed=args.seed)
    else:
        defaults = TinySpec()
        spec = TinySpec(
            architecture=args.arch,
            num_layers=_pick(args.layers, defaults.num_layers),
            hidden_size=_pick(args.hidden, defaults.hidden_size),
            num_heads=_pick(args.heads, defaults.num_heads),
            num_kv_heads=_pick(args.kv_heads, defaults.num_kv_heads),
            intermediate_size=_pick(args.intermediate, defaults.intermediate_size),
            vocab_size=_pick(args.vocab, defaults.vocab_size),
            tie_word_embeddings=args.tied,
            dtype=args.dtype or defaults.dtype,
            seed=args.seed)
    made = create_tiny(args.directory, spec, shards=args.shards)
    print(f"wrote {made.directory}: {spec.architecture}, {spec.num_layers} layers, hidden "
          f"{spec.hidden_size}, vocab {spec.vocab_size}, {spec.dtype}, "
          f"{made.nbytes / 1e6:.1f} MB in {len(made.files)} file(s)")
    return 0


def _pick(value: int | None, default: int) -> int:
    return default if value is None else value


def _store(args: argparse.Namespace) -> Any:
    from shared.model.store_dir import ModelStoreDir

    return ModelStoreDir(args.store)


def _add(args: argparse.Namespace) -> int:
    store = _store(args)
    manifest = store.add(args.name, args.directory, num_blocks=args.blocks, replace=args.replace,
                         progress=False if args.no_progress else None)
    print(f"added {manifest.name}: {manifest.num_blocks} blocks, "
          f"{manifest.total_bytes / 1e6:.1f} MB, in {store.model_dir(manifest.name)}")
    return 0


def _summary(manifest: Any) -> dict[str, Any]:
    cfg = manifest.config
    return {"name": manifest.name, "architecture": cfg.architecture, "layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "dtype": cfg.dtype,
            "blocks": manifest.num_blocks, "bytes": manifest.total_bytes}


def _ls(args: argparse.Namespace) -> int:
    rows = [_summary(m) for m in _store(args).manifests()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no models")
        return 0
    header = f"{'NAME':<24} {'ARCH':<8} {'LAYERS':>6} {'BLOCKS':>6} {'DTYPE':<9} {'SIZE':>10}"
    print(header)
    for r in rows:
        print(f"{r['name']:<24} {r['architecture']:<8} {r['layers']:>6} {r['blocks']:>6} "
              f"{r['dtype']:<9} {r['bytes'] / 1e6:>8.1f}MB")
    return 0


def _rm(args: argparse.Namespace) -> int:
    _store(args).remove(args.name)
    print(f"removed {args.name}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    store = _store(args)
    store.verify(args.name)
    print(f"{args.name}: all {store.manifest(args.name).num_blocks} blocks match their checksums")
    return 0
