"""How much the demo's numbers move with the CPU's floating-point kernels.

    python bench/demo_spread.py [--output_root=bench_output/demo_spread]
        [--isas=ALL,AVX512_CORE,AVX2] [--nodeterminism_cost]

Runs ``python -m delg_tf.demo`` (``make demo``) once per oneDNN instruction set, each
in a fresh process with ``ONEDNN_MAX_CPU_ISA`` set (``ALL`` = what this CPU has;
``AVX2`` runs the kernels an AVX2-only CPU runs), plus a second run of the first
instruction set to check that two runs give an identical ``results.json``, and
(unless ``--nodeterminism_cost``) a run with ``--train_flags=--nodeterministic`` to
measure what TF op determinism costs in training time. Instruction sets this CPU
lacks are skipped (oneDNN would fall back silently).

Prints one table: each metric of the demo (revisitop Easy/Medium/Hard mAP and mP@5,
global and re-ranked) per instruction set, its spread (max - min) and the training
seconds; then whether the repeated run was identical and the determinism cost
(deterministic / non-deterministic training seconds, same machine, same run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROWS = ("global", "reranked")
PROTOCOLS = ("easy", "medium", "hard")
METRICS = ("mAP", "mP@5")
# ONEDNN_MAX_CPU_ISA value -> /proc/cpuinfo flag the CPU needs for it.
ISA_CPU_FLAG = {
    "ALL": None,
    "AVX512_CORE_AMX": "amx_tile",
    "AVX512_CORE_BF16": "avx512_bf16",
    "AVX512_CORE": "avx512bw",
    "AVX2": "avx2",
    "AVX": "avx",
    "SSE41": "sse4_1",
}


def cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def run_demo(output_dir: Path, isa: str, train_flags=()) -> dict:
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
    command = [sys.executable, "-m", "delg_tf.demo", f"--output_dir={output_dir}", "--noprogress"]
    if train_flags:
        command.append("--train_flags=" + ",".join(train_flags))
    print(f"$ ONEDNN_MAX_CPU_ISA={isa} {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: the demo failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    results = json.loads((output_dir / "results.json").read_text())
    timings = json.loads((output_dir / "timings.json").read_text())
    return {
        "results": results,
        "train_seconds": timings["stage_seconds"]["train"],
        "text": (output_dir / "results.json").read_text(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_root", default="bench_output/demo_spread")
    parser.add_argument(
        "--isas", default="ALL,AVX512_CORE,AVX2", help="comma-separated ONEDNN_MAX_CPU_ISA values"
    )
    parser.add_argument(
        "--nodeterminism_cost", action="store_true", help="skip the non-deterministic training run"
    )
    args = parser.parse_args(argv)
    root = Path(args.output_root)
    flags = cpu_flags()
    isas = []
    for isa in [s.strip().upper() for s in args.isas.split(",") if s.strip()]:
        if isa not in ISA_CPU_FLAG:
            sys.exit(f"error: --isas: unknown {isa!r}; expected some of {sorted(ISA_CPU_FLAG)}")
        need = ISA_CPU_FLAG[isa]
        if need and flags and need not in flags:
            print(f"skipping {isa}: this CPU has no {need}")
            continue
        isas.append(isa)
    if not isas:
        sys.exit("error: --isas: none of them runs on this CPU")
    runs = {}
    for isa in isas:
        runs[isa] = run_demo(root / isa.lower(), isa)
    repeat = run_demo(root / f"{isas[0].lower()}_again", isas[0])
    nondet = None
    if not args.nodeterminism_cost:
        nondet = run_demo(
            root / f"{isas[0].lower()}_nodeterministic", isas[0], ("--nodeterministic",)
        )

    print()
    header = f"{'metric':<22}" + "".join(f"{isa:>13}" for isa in isas) + f"{'spread':>9}"
    print(header)
    print("-" * len(header))
    for row in ROWS:
        for protocol in PROTOCOLS:
            for metric in METRICS:
                values = [runs[isa]["results"][row][protocol][metric] for isa in isas]
                print(
                    f"{row + ' ' + protocol + ' ' + metric:<22}"
                    + "".join(f"{v:>13.2f}" for v in values)
                    + f"{max(values) - min(values):>9.2f}"
                )
    print(
        f"{'train seconds':<22}" + "".join(f"{runs[isa]['train_seconds']:>13.1f}" for isa in isas)
    )
    same = repeat["text"] == runs[isas[0]]["text"]
    print(f"\nsecond run with {isas[0]}: results.json {'identical' if same else 'DIFFERENT'}")
    if nondet is not None:
        det_s, nondet_s = runs[isas[0]]["train_seconds"], nondet["train_seconds"]
        print(
            f"training with {isas[0]}: deterministic {det_s:.1f} s, non-deterministic "
            f"{nondet_s:.1f} s (x{det_s / nondet_s:.2f}); non-deterministic medium mAP "
            f"global {nondet['results']['global']['mAP']:.2f}, re-ranked "
            f"{nondet['results']['reranked']['mAP']:.2f}"
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
