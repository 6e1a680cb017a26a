"""``lscale model``: create tiny checkpoints and manage the model store.

    lscale model create-tiny DIR [--arch llama] [--layers 2] [--hidden 64] ... [--size-mb N]
    lscale model add NAME DIR [--blocks B] [--replace] [--no-progress] [--timeout S] [WHERE]
    lscale model ls [--json] [WHERE]
    lscale model rm NAME [WHERE]
    lscale model verify NAME [--store DIR]

WHERE: when a cluster is found (``--nats-url``, ``LSCALE_NATS_URL``, or the record `lscale up`
keeps in the state directory), add/ls/rm go through its model_store service over NATS, so the
registry it publishes stays in step (``add`` sends the checkpoint directory's absolute path:
the store reads it on its own host, and progress comes back as ``model.ingest`` events).
``--local`` or ``--store DIR``, or no cluster, work on a store directory directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from services.cli.cluster import default_state_dir

ADD_TIMEOUT_S = 3600.0  # an ingest of a large checkpoint takes minutes; progress shows life
REQUEST_TIMEOUT_S = 10.0

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
    add.add_argument("--timeout", type=float, default=ADD_TIMEOUT_S,
                     help=f"seconds to wait for a cluster's store (default {ADD_TIMEOUT_S:g})")
    _store_option(add, cluster=True)
    add.set_defaults(func=_add)

    ls = sub.add_parser("ls", help="list models in the store")
    ls.add_argument("--json", action="store_true", help="print JSON")
    _store_option(ls, cluster=True)
    ls.set_defaults(func=_ls)

    rm = sub.add_parser("rm", help="remove a model from the store")
    rm.add_argument("name", metavar="NAME")
    _store_option(rm, cluster=True)
    rm.set_defaults(func=_rm)

    verify = sub.add_parser("verify", help="check every block of a model against its checksum")
    verify.add_argument("name", metavar="NAME")
    _store_option(verify)
    verify.set_defaults(func=_verify)


def _store_option(parser: argparse.ArgumentParser, *, cluster: bool = False) -> None:
    parser.add_argument("--store", metavar="DIR",
                        help="store directory (default $LSCALE_STATE_DIR/models, "
                             "LSCALE_STATE_DIR defaulting to .lscale)"
                             + ("; implies --local" if cluster else ""))
    if not cluster:
        return
    parser.add_argument("--local", action="store_true",
                        help="use the store directory even when a cluster is running")
    parser.add_argument("--nats-url", default=None,
                        help="the cluster's NATS URL (default: LSCALE_NATS_URL, or the one "
                             "`lscale up` recorded in the state dir)")
    parser.add_argument("--state-dir", default=default_state_dir(),
                        help="where `lscale up` keeps its record (default .lscale, env "
                             "LSCALE_STATE_DIR)")


def _cluster_url(args: argparse.Namespace) -> str | None:
    """The NATS URL of the cluster whose store to use; None: the local store directory."""
    from services.cli.cluster import resolve_nats_url
    from shared.errors import ConfigError

    if args.local or args.store:
        return None
    try:
        return resolve_nats_url(args.nats_url, args.state_dir)
    except ConfigError:
        return None  # no cluster: the store directory, as without one


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
    if (url := _cluster_url(args)) is not None:
        from shared.runtime import run_async

        return int(run_async(_remote_add(url, args)))
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
    if (url := _cluster_url(args)) is not None:
        from shared.runtime import run_async

        rows = [_row(r) for r in run_async(_remote(url, "STORE_LIST", {}, args.state_dir))]
    else:
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
    if (url := _cluster_url(args)) is not None:
        from shared.runtime import run_async

        run_async(_remote(url, "STORE_REMOVE", {"name": args.name}, args.state_dir))
    else:
        _store(args).remove(args.name)
    print(f"removed {args.name}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    store = _store(args)
    store.verify(args.name)
    print(f"{args.name}: all {store.manifest(args.name).num_blocks} blocks match their checksums")
    return 0


# --- through a cluster's model_store service ------------------------------------------------
def _row(raw: Any) -> dict[str, Any]:
    """A STORE_LIST item as the same row ``ls`` prints for a local store (plus tier/time)."""
    from shared.messages import ModelSummary

    m = ModelSummary.from_wire(raw)
    return {"name": m.name, "architecture": m.architecture, "layers": m.num_layers,
            "hidden_size": m.hidden_size, "vocab_size": m.vocab_size, "dtype": m.dtype,
            "blocks": m.num_blocks, "bytes": m.total_bytes, "in_memory": m.in_memory,
            "created": m.created}


async def _connect(url: str, state_dir: str = ".lscale") -> Any:
    from services.cli.cluster import cli_auth
    from shared.bus import Bus
    from shared.errors import NotConnected

    try:
        return await Bus.connect(url, "lscale-cli", max_reconnect_attempts=0,
                                 auth=cli_auth(state_dir))
    except NotConnected as exc:
        raise NotConnected(f"{exc.message} (a stale cluster record? --local uses the store "
                           "directory)") from exc


async def _request(bus: Any, subject_name: str, body: Any, timeout: float) -> Any:
    from shared import subjects
    from shared.errors import NoResponders

    subject = getattr(subjects, subject_name)
    try:
        return await bus.request(subject, body, timeout=timeout)
    except NoResponders as exc:
        raise NoResponders(f"no model_store service answers {subject} (is the cluster "
                           "running? --local uses the store directory)", subject=subject
                           ) from exc


async def _remote(url: str, subject_name: str, body: Any, state_dir: str = ".lscale") -> Any:
    bus = await _connect(url, state_dir)
    try:
        return await _request(bus, subject_name, body, REQUEST_TIMEOUT_S)
    finally:
        await bus.close()


class _IngestProgress:
    """Shows ``model.ingest`` events: a bar on a terminal, otherwise one line per block."""

    def __init__(self, name: str, enabled: bool) -> None:
        self.name = name
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.blocks_done = -1
        self._bar: Any = None

    def update(self, data: Mapping[str, Any]) -> None:
        blocks_done = int(data.get("blocks_done") or 0)
        if not self.enabled or data.get("state") not in ("started", "running") \
                or blocks_done <= self.blocks_done:  # events may arrive out of order
            return
        self.blocks_done = blocks_done
        done, total = int(data.get("bytes_done") or 0), int(data.get("bytes_total") or 0)
        if self.tty:
            from tqdm import tqdm

            if self._bar is None:
                self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                 desc=f"ingest {self.name}", file=sys.stderr, leave=False)
            self._bar.update(done - self._bar.n)
        else:
            print(f"ingest {self.name}: {blocks_done}/{data.get('blocks_total')} blocks, "
                  f"{done / 1e6:.1f}/{total / 1e6:.1f} MB", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def _remote_add(url: str, args: argparse.Namespace) -> int:
    import secrets
    from pathlib import Path

    from services.model_store.service import INGEST_EVENT
    from shared import subjects
    from shared.messages import AddModel, Event, ModelSummary

    request = AddModel(name=args.name, path=str(Path(args.directory).resolve()),
                       blocks=args.blocks, replace=args.replace,
                       request_id=secrets.token_hex(8))
    progress = _IngestProgress(args.name, enabled=not args.no_progress)

    async def on_event(event: Event, msg: Any) -> None:
        if event.data.get("request_id") == request.request_id:
            progress.update(event.data)

    bus = await _connect(url, args.state_dir)
    try:
        await bus.subscribe(subjects.event(INGEST_EVENT), on_event, message_type=Event)
        await bus.nc.flush()  # subscribed before the first event can be sent
        reply = await _request(bus, "STORE_ADD", request, args.timeout)
    finally:
        progress.close()
        await bus.close()
    added = ModelSummary.from_wire(reply)
    print(f"added {added.name}: {added.num_blocks} blocks, {added.total_bytes / 1e6:.1f} MB, "
          f"in the cluster's store ({url})")
    return 0
