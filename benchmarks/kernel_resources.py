"""Static resource report of the CUDA kernels: registers, spills, stack frame and occupancy.

Compiles each ``csrc/cuda/*.cu`` with ``nvcc -Xptxas -v`` for one architecture (no GPU needed)
and prints, per kernel matching ``--match``, what ptxas reports plus the resident 256-thread
blocks per SM those registers allow. It is how kernel changes are checked on a machine without a
GPU; the timings still come from ``benchmarks/device_check.sh``.

    python -m benchmarks.kernel_resources [--arch 90] [--match REGEX] [--files A.cu ...]
                                          [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The instantiations the GPU benchmark runs (fp32 / bf16 logits with fp32 soft targets, K = 3;
# context_labels with t = 2 generator channels and int64 labels; the distance transform).
DEFAULT_MATCH = (r"dce_(fwd|bwd)_kernel<(float|bfloat16_t), float, false, 3>"
                 r"|dce_finalize_kernel<float>|(fwd|bwd)_(tiled|flat)<float, long, 2>"
                 r"|lines_|rows_")
REGS_PER_SM = 65536
THREADS = 256


def blocks_per_sm(regs: int, threads: int = THREADS) -> int:
    """Resident blocks allowed by registers alone (allocation unit: 256 registers per warp)."""
    per_warp = -(-regs * 32 // 256) * 256
    return REGS_PER_SM // (per_warp * (threads // 32))


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return [n.replace("(anonymous namespace)::", "").replace("colabx::", "").replace("cuda::", "")
            .split("(")[0].removeprefix("void ") for n in out]


def ptxas_report(source: Path, arch: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            ["nvcc", "-std=c++17", "-O3", f"-arch=sm_{arch}", f"-I{ROOT / 'csrc'}", "-Xptxas", "-v",
             "-cubin", "-o", str(Path(tmp) / "k.cubin"), str(source)],
            capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"nvcc failed on {source}:\n{proc.stderr[-4000:]}")
    rows, current, stack = [], None, (0, 0, 0)
    for line in proc.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            current = m.group(1)
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                            r"loads", line):
            stack = tuple(int(x) for x in m.groups())
        elif (m := re.search(r"Used (\d+) registers", line)) and current:
            rows.append({"file": source.name, "mangled": current, "registers": int(m.group(1)),
                         "stack_bytes": stack[0], "spill_store_bytes": stack[1],
                         "spill_load_bytes": stack[2]})
            current = None
    for row, name in zip(rows, demangle([r.pop("mangled") for r in rows]), strict=True):
        row["kernel"] = name
        row["blocks_per_sm_256"] = blocks_per_sm(row["registers"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90", help="SM architecture, e.g. 90 (H100/H200) or 80")
    ap.add_argument("--match", default=DEFAULT_MATCH, help="regex over demangled kernel names")
    ap.add_argument("--files", nargs="+", help="only these csrc/cuda sources (default: all)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    pattern = re.compile(args.match)
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if args.files:
        missing = set(args.files) - {s.name for s in sources}
        if missing:
            sys.exit(f"no such CUDA source under csrc/cuda: {', '.join(sorted(missing))}")
        sources = [s for s in sources if s.name in args.files]
    if shutil.which("nvcc") is None:
        sys.exit("nvcc not found: this report compiles the CUDA sources")
    rows = [r for src in sources for r in ptxas_report(src, args.arch)
            if pattern.search(r["kernel"])]
    print(f"sm_{args.arch}: registers, stack/spill bytes, 256-thread blocks per SM by registers")
    print(f"{'kernel':<58} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'blocks':>6}")
    for r in rows:
        spill = f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"
        print(f"{r['kernel'][:58]:<58} {r['registers']:>4} {r['stack_bytes']:>5} {spill:>11} "
              f"{r['blocks_per_sm_256']:>6}")
    if args.out:
        Path(args.out).write_text(json.dumps({"arch": args.arch, "kernels": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
