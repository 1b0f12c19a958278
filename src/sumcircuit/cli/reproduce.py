"""``sumcircuit reproduce``: the whole study as resumable stages, then the report.

Rerunning the same command skips finished stages; an interrupted stage resumes.
"""

from __future__ import annotations

import argparse

from sumcircuit.cli.common import DEVICE_HELP, DTYPE_HELP, device, dtype, print_json
from sumcircuit.errors import SumcircuitError
from sumcircuit.options import STUDY_PRESETS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("reproduce", help="run the whole study (resumable) and write the report",
                                   description=__doc__)
    parser.add_argument("--model", required=True, help="base model spec (see `sumcircuit models`)")
    parser.add_argument("--data", required=True, help="training data (file, folder with --split, hf:..., preset)")
    parser.add_argument("--split", default="train", help="training split (default: %(default)s)")
    parser.add_argument("--eval-data", help="evaluation data (default: --data with split 'val')")
    parser.add_argument("--eval-split", help="split of --eval-data")
    parser.add_argument("--val-split", help="split of --data for early-stopping validation (default: the "
                                            "preset's; quick holds out a seeded slice of the training docs)")
    parser.add_argument("--preset", default="quick", choices=STUDY_PRESETS,
                        help="quick: CI-sized smoke test (~15 min on a 2-core CPU); cpu: ~60 min on 2 CPU cores, "
                             "3 seeds; gpu: ~20 min on one H200-class GPU, 3 seeds; paper: the paper's "
                             "hyper-parameters at full scale (GPU)")
    parser.add_argument("--seeds", help="comma-separated training seeds: every method and every random layer set "
                                        "is trained once per seed (default: the preset's)")
    parser.add_argument("--device", type=device, default="cpu", help=DEVICE_HELP)
    parser.add_argument("--dtype", type=dtype, default="float32", help=DTYPE_HELP)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override a preset field, e.g. --set eval_docs=8 --set 'full={\"max_steps\": 4}' "
                             "(repeatable; fields: see sumcircuit.reproduce.StudyPreset)")
    parser.add_argument("--out", required=True, help="run directory")
    parser.set_defaults(handler=run)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise SumcircuitError(f"--seeds must be comma-separated integers, got '{text}'") from None
    if not seeds:
        raise SumcircuitError("--seeds needs at least one seed")
    return seeds


def _overrides(items: list[str]) -> dict[str, object]:
    import json

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SumcircuitError(f"--set {item}: expected FIELD=JSON, e.g. eval_docs=8")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise SumcircuitError(f"--set {item}: the value is not JSON ({exc.msg})") from None
    return out


def run(args: argparse.Namespace) -> int:
    from sumcircuit.reproduce import StudyConfig, run_study

    cfg = StudyConfig(model=args.model, data=args.data, split=args.split, eval_data=args.eval_data,
                      eval_split=args.eval_split, val_split=args.val_split, preset=args.preset,
                      seeds=_seeds(args.seeds) if args.seeds is not None else None,
                      device=args.device, dtype=args.dtype, overrides=_overrides(args.set))
    manifest = run_study(cfg, args.out).summary
    print_json({"stages": manifest["stages"], "wall_time_s": manifest["wall_time_s"]})
    return 0
