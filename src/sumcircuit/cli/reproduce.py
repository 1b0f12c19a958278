"""``sumcircuit reproduce``: the whole study as resumable stages, then the report.

Rerunning the same command skips finished stages; an interrupted stage resumes.
"""

from __future__ import annotations

import argparse

from sumcircuit.cli.common import Subparsers, add_out, add_resume, add_runtime, print_json, runtime_from_args
from sumcircuit.cli.generate import add_config, config_from_args
from sumcircuit.study.config import StudyConfig
from sumcircuit.study.executors import ExecutorConfig


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("reproduce", help="run the whole study (resumable) and write the report",
                                   description=__doc__)
    add_config(parser, StudyConfig, required=("model", "data"))
    add_runtime(parser, only=("device", "dtype"))
    add_config(parser, ExecutorConfig)
    add_resume(parser, what="stages (moved to RUN/.stale/)")
    add_out(parser, "run directory")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sumcircuit.study.run import run_study

    manifest = run_study(config_from_args(StudyConfig, args), args.out, runtime=runtime_from_args(args),
                         resume=args.resume, executor=config_from_args(ExecutorConfig, args)).summary
    print_json({"stages": manifest["stages"], "wall_time_s": manifest["wall_time_s"]})
    return 0
