"""``sumcircuit data``: preview a data set before spending hours on it."""

from __future__ import annotations

import argparse

from sumcircuit.cli.common import Subparsers, add_data, data_from_args, print_json


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "data", help="preview a data set: records, fields, token lengths, truncation, invalid records",
        description=__doc__)
    add_data(parser, positional=True)
    parser.add_argument("--model", help="tokenize with this model's tokenizer to report token lengths")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=run)


def _fmt(stats: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())


def run(args: argparse.Namespace) -> int:
    from sumcircuit.data.overview import preview

    tokenizer = None
    if args.model:
        from sumcircuit.models import load_model

        tokenizer = load_model(args.model).tokenizer
    report = preview(data_from_args(args), tokenizer)
    if args.json:
        print_json(report)
        return 0
    print(f"data:        {report['data']}  (split {report['split']}, sha256 {str(report['sha256'])[:16]})")
    print(f"fields:      document '{report['text_field']}', summary {report['summary_fields']}")
    print(f"records:     {report['records']} read, {report['valid']} valid, {report['invalid']} invalid")
    for err in report["invalid_examples"]:
        print(f"  invalid:   {err}")
    print(f"references:  {_fmt(report['references_per_example'])}")
    print(f"doc chars:   {_fmt(report['document_chars'])}")
    print(f"sum chars:   {_fmt(report['summary_chars'])}")
    if tokenizer is not None:
        print(f"doc tokens:  {_fmt(report['document_tokens'])}")
        print(f"sum tokens:  {_fmt(report['summary_tokens'])}")
        print(f"total:       {_fmt(report['total_tokens'])}")
        print(f"truncated:   {report['truncated_documents']} documents to fit --max-tokens "
              f"{report['max_tokens']}, {report['truncated_summaries']} summaries")
    return 0
