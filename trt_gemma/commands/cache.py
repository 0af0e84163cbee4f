"""`trt-gemma cache ls|prune`: the local cache of converted checkpoints and onnxruntime exports (runtime/cache.py)."""
from __future__ import annotations

import click

from trt_gemma.console import human_size as _size
from trt_gemma.console import plain as _out


@click.group("cache")
def cache():
    """The cache of converted checkpoints and ONNX exports ($TRT_GEMMA_CACHE, capped by $TRT_GEMMA_CACHE_MAX)."""


@cache.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ls(as_json):
    """List the entries, least recently used first, with their size, the total and the cap."""
    from trt_gemma.console import emit
    from trt_gemma.runtime.cache import summary

    emit(summary(), as_json, _render)


@cache.command("prune")
@click.option("--max", "max_size", default=None, metavar="SIZE",
              help="Keep at most SIZE (e.g. 500M, 2G, 0) [default: $TRT_GEMMA_CACHE_MAX, else 2G].")
@click.option("--all", "everything", is_flag=True, help="Remove every entry not in use (same as --max 0).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def prune(max_size, everything, as_json):
    """Remove least recently used entries until the cache fits the cap (entries being written stay)."""
    from trt_gemma.console import emit
    from trt_gemma.runtime import cache as c

    cap = 0 if everything else c.parse_size(max_size, "--max") if max_size is not None else c.max_bytes()
    removed = c.prune(None, cap)
    data = {**c.summary(), "cap_applied_bytes": cap, "removed": [{"namespace": e.namespace, "name": e.name,
                                                                   "bytes": e.bytes} for e in removed]}
    emit(data, as_json, _render)


def _render(d: dict) -> None:
    for e in d.get("removed", []):
        _out(f"removed {e['namespace']}/{e['name']}  ({_size(e['bytes'])})")
    _out(f"{d['root']}: {len(d['entries'])} entries, {_size(d['total_bytes'])} of {_size(d['max_bytes'])} "
         f"(least recently used first)")
    for e in d["entries"]:
        _out(f"  {e['namespace'] + '/' + e['name']:<60} {_size(e['bytes']):>10}  used {e['last_used_utc']}")
