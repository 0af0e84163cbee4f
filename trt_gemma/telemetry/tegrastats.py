"""Parser for `tegrastats` lines (L4T 32 / JetPack 4, L4T 35 / JetPack 5, R36 / JetPack 6, R38-39 / JetPack 7, Thor).

Formats (docs/facts/serving-telemetry.md §4; jetson_stats jtop/core/tegra_parse.py):
- optional leading timestamp `MM-DD-YYYY HH:MM:SS`;
- `RAM used/totalMB (lfb NxSIZE)` with SIZE in MB or kB; `SWAP used/totalMB (cached NMB)`;
  `IRAM used/totalkB (lfb NkB)`;
- `CPU [X%@MHz,...]`, entries may be `off`;
- engines: `NAME X%@MHz`, `NAME X%` (non-root), `NAME X%@[f1,f2]` (per-GPC, JP7 and some JP6), `NAME @[f...]` (Thor),
  `NAME off`, `NAME MHz` (APE, VIC_FREQ, NVJPG1);
- temperatures `name@TC` or `name@cur/avgC` (JP7); -256C = sensor absent;
- rails `NAME cur/avg` (no unit, L4T 32), `NAME curmW/avgmW` (L4T 35+), `NAME a/b/c mW` three values on JP7 (third
  value's meaning is unconfirmed, kept as `third_mw`).
Tokens we do not recognise are ignored, so abridged lines ("...") still parse.
"""
from __future__ import annotations

import re
from typing import Any

_TIMESTAMP = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB \(lfb (\d+)x(\d+)(MB|kB)\)")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB \(cached (\d+)MB\)")
_IRAM = re.compile(r"\bIRAM (\d+)/(\d+)kB \(lfb (\d+)kB\)")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_CPU_CORE = re.compile(r"^(\d+)%@(\d+)$")
# An engine value must end at whitespace, so "RAM 779/7620MB" and rails "VDD_IN 6626mW/..." never match here.
_ENGINE = re.compile(r"(?<![\w@])([A-Z][A-Z0-9_]*) (off|(?:\d+|N)?%?@\[[\d,]+\]|(?:\d+|N)%(?:@\d+)?|\d+)(?=\s|$)")
_TEMP = re.compile(r"(?<![\w@])([A-Za-z][\w-]*)@(-?[\d.]+)C(?:/(-?[\d.]+)C)?(?=\s|$)")
_RAIL = re.compile(r"(?<![\w@])([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?:/(\d+)(?:mW)?)?(?=\s|$)")
_SIZE_KB = {"MB": 1024, "kB": 1}
ABSENT_C = -256.0


def parse_tegrastats(line: str) -> dict[str, Any]:
    """One tegrastats line -> dict; fields the line lacks are absent from the result (not zero)."""
    out: dict[str, Any] = {}
    if m := _TIMESTAMP.match(line):
        out["timestamp"] = m.group(1)
    if m := _RAM.search(line):
        out["ram"] = {"used_mb": int(m.group(1)), "total_mb": int(m.group(2)), "lfb_blocks": int(m.group(3)),
                      "lfb_block_kb": int(m.group(4)) * _SIZE_KB[m.group(5)]}
    if m := _SWAP.search(line):
        out["swap"] = {"used_mb": int(m.group(1)), "total_mb": int(m.group(2)), "cached_mb": int(m.group(3))}
    if m := _IRAM.search(line):
        out["iram"] = {"used_kb": int(m.group(1)), "total_kb": int(m.group(2)), "lfb_kb": int(m.group(3))}
    if m := _CPU.search(line):
        out["cpu"] = _cpus(m.group(1))
    rest = _CPU.sub(" ", line)
    engines = {m.group(1): _engine(m.group(2)) for m in _ENGINE.finditer(rest)}
    if engines:
        out["engines"] = engines
    temps = {m.group(1): _temp(m.group(2)) for m in _TEMP.finditer(rest)}
    if temps:
        out["temperatures_c"] = temps
    rails = _rails(rest)
    if rails:
        out["rails"] = rails
    return out


def _cpus(body: str) -> list[dict[str, Any]]:
    """Cores in order; "off" cores kept (online False); placeholders such as "..." are dropped."""
    cores = []
    for entry in (e.strip() for e in body.split(",")):
        if entry == "off":
            cores.append({"online": False, "load_percent": None, "freq_mhz": None})
        elif m := _CPU_CORE.match(entry):
            cores.append({"online": True, "load_percent": int(m.group(1)), "freq_mhz": int(m.group(2))})
    return cores


def _engine(value: str) -> dict[str, Any]:
    """X%@MHz | X% | X%@[f,..] | @[f,..] | off | MHz -> {util_percent, freq_mhz (int or per-GPC list), off}."""
    if value == "off":
        return {"off": True, "util_percent": None, "freq_mhz": None}
    util, _, freq = value.partition("@") if "%" in value or "@" in value else ("", "", value)
    util_num = util.rstrip("%")
    if freq.startswith("["):
        freq_val: Any = [int(f) for f in freq[1:-1].split(",") if f]
    else:
        freq_val = int(freq) if freq else None
    return {"off": False, "util_percent": int(util_num) if util_num.isdigit() else None, "freq_mhz": freq_val}


def _temp(value: str) -> float | None:
    c = float(value)
    return None if c == ABSENT_C else c


def _rails(text: str) -> dict[str, dict[str, int | None]]:
    rails: dict[str, dict[str, int | None]] = {}
    for m in _RAIL.finditer(text):
        if m.group(1) in ("RAM", "SWAP", "IRAM"):
            continue
        name = m.group(1)
        key, n = name, 2
        while key in rails:  # AGX Orin prints two "NC" rails
            key, n = f"{name}_{n}", n + 1
        rails[key] = {"current_mw": int(m.group(2)), "average_mw": int(m.group(3)),
                      "third_mw": int(m.group(4)) if m.group(4) else None}
    return rails
