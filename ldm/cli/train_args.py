"""The command line of both training tools: the config, `KEY=VALUE` overrides anywhere on the line
(before or after the flags), and what to do with an output folder that holds a run."""

from __future__ import annotations

import argparse


def training_parser(description: str, example_config: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help=f"config YAML (e.g. {example_config})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.steps=500 (before or after the flags)")
    folder = parser.add_argument_group("the output folder (train.output_dir; see docs/training.md)")
    how = folder.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true",
                     help="continue the run in train.output_dir from its latest training state (an error when there "
                          "is none, or when the config differs in a setting that changes the result)")
    how.add_argument("--overwrite", action="store_true",
                     help="start a new run where another one is: the old folder is moved aside to "
                          "OUTPUT_DIR.old-TIME, nothing is deleted")
    folder.add_argument("--resume-with-changes", action="store_true",
                        help="with --resume: continue even though the config differs from the state's in settings "
                             "that change the result (e.g. more train.steps); the differences are printed")
    return parser


def parse_training_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse with the overrides allowed anywhere (`config --resume train.steps=20`)."""
    args = parser.parse_intermixed_args(argv)
    if args.resume_with_changes:
        args.resume = True  # it names the resume it changes
    return args
