"""A whole study, old code vs new: wall time per kind of stage, and the two claims tables side by side.

Runs ``sumcircuit reproduce`` twice on the same machine, one after the other:
``new`` with this checkout's code and ``old`` with the code of ``--old``
(a commit, checked out with ``git worktree`` into ``OUT/oldsrc`` and put
first on ``PYTHONPATH``). Same model, data, preset, seeds and overrides;
each in its own folder (``OUT/new``, ``OUT/old``), so a rerun skips what has
finished. ``--set`` shrinks the preset (e.g. ``--set eval_docs=4``) for a quick
check; without it this is the preset end to end. Prints markdown.

    python benchmarks/study_speed.py --old 15dbe89 --preset cpu --out /tmp/speed \\
        [--model smollm2-135m-instruct] [--data ../shared/data/cnndm_gpt4] [--set FIELD=JSON ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _kind(stage: str) -> str:
    if stage.endswith("/eval"):
        return "evaluation (generation + ROUGE)"
    if stage.startswith("full_"):
        return "training: full"
    if re.search(r"_s\d+$", stage):
        return "training: LoRA arms"
    return stage  # analysis, circuits, attribution, causal stages


def _env(which: str, args: argparse.Namespace, out: Path) -> dict[str, str]:
    """This checkout's code for ``new``; the ``--old`` commit's, first on PYTHONPATH, for ``old``."""
    env = dict(os.environ)
    if which == "old":
        src = out / "oldsrc"
        if not src.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-f", str(src), args.old], check=True)
        env["PYTHONPATH"] = str(src / "src")
    return env


def run(which: str, args: argparse.Namespace, out: Path) -> dict:
    env = _env(which, args, out)
    cmd = [sys.executable, "-m", "sumcircuit.cli", "reproduce", "--model", args.model, "--data", args.data,
           "--preset", args.preset, "--out", str(out / which), *[x for s in args.set for x in ("--set", s)]]
    with open(out / f"{which}.log", "a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    manifest: dict = json.loads((out / which / "reproduce.json").read_text())
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="the commit to compare against")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cnndm_gpt4"))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifests = {which: run(which, args, out) for which in ("new", "old")}
    walls: dict[str, dict[str, float]] = {w: defaultdict(float) for w in manifests}
    for which, manifest in manifests.items():
        for stage, seconds in manifest["wall_time_s"].items():
            walls[which][_kind(stage)] += seconds
    print(f"`{args.preset}` preset ({', '.join(args.set) or 'as shipped'}), {args.model}; old = {args.old}, "
          "new = this checkout; stage wall times from each run's reproduce.json\n")
    print("| stages | old (min) | new (min) | new / old |\n|---|---|---|---|")
    for kind in sorted(set(walls["old"]) | set(walls["new"])):
        o, n = walls["old"].get(kind, 0.0) / 60, walls["new"].get(kind, 0.0) / 60
        print(f"| {kind} | {o:.1f} | {n:.1f} | {n / o if o else float('nan'):.2f}x |")
    o, n = sum(walls["old"].values()) / 60, sum(walls["new"].values()) / 60
    print(f"| **all** | **{o:.1f}** | **{n:.1f}** | **{n / o:.2f}x** |\n")
    claims = {w: {c["claim"]: c for c in _claims(out / w, _env(w, args, out))} for w in manifests}
    print("| claim | old verdict | new verdict | old: this run | new: this run |\n|---|---|---|---|---|")
    for name in claims["new"]:
        a, b = claims["old"].get(name, {}), claims["new"][name]
        print(f"| {name} | {a.get('verdict', '-')} | {b['verdict']} | {a.get('this_run', '-')} | {b['this_run']} |")


def _claims(run_dir: Path, env: dict[str, str]) -> list[dict]:
    """The claims table as that run's own code judges it."""
    code = "import json, sys, sumcircuit as sc; print(json.dumps(sc.load_run(sys.argv[1]).claims, default=str))"
    done = subprocess.run([sys.executable, "-c", code, str(run_dir)], check=True, capture_output=True, text=True,
                          env=env, cwd=REPO)
    rows: list[dict] = json.loads(done.stdout.strip().splitlines()[-1])
    return rows


if __name__ == "__main__":
    main()
