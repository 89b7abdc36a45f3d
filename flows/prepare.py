"""Import, validate and describe a dataset through Prefect, once.

    python -m flows.prepare --source /data/stanford_cars --dest studies/data/cars --crop bbox
    python -m flows.prepare --source /data/car_data --dest studies/data/cars --format folders

Writes manifest.csv (a study's [data] path may point at it), summary.json and problems.csv to
--dest. Preparing again with nothing changed reads no file; changed or added files are picked up.
"""

from __future__ import annotations

import argparse
import logging

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE as NO_CACHE

from flows.common import engine_logging, run_cli, setup_logging
from transferstudy.config import FORMATS
from transferstudy.datasets import open as open_mod
from transferstudy.datasets import prepare as prepare_mod

log = logging.getLogger("transferstudy.flows")


@task(name="prepare-dataset", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def prepare_dataset(source: str, dest: str, format: str, crop: str | None) -> dict:
    """Scan, decode-check and hash the source (unchanged files are skipped), write the manifest."""
    result = prepare_mod.prepare(source, dest, format, crop)
    return {
        "manifest": str(result.manifest_path),
        "summary": str(result.summary_path),
        "problems_file": str(result.problems_path),
        "images": len(result.index.samples),
        "classes": result.index.num_classes,
        "problems": [[p.path, p.reason] for p in result.problems],
        "hashed": result.n_hashed,
        "decoded": result.n_decoded,
    }


@flow(name="prepare-dataset")
def prepare_flow(source: str, dest: str, format: str = "auto", crop: str | None = None) -> dict:
    """Prepare one dataset; the problem table also becomes a flow-run artifact."""
    engine_logging()
    outcome = prepare_dataset(source, dest, format, crop)
    rows = "\n".join(f"| `{f}` | {r} |" for f, r in outcome["problems"][:200]) or "| - | none |"
    create_markdown_artifact(
        key="dataset-problems",
        markdown=f"# Problems found in {source}\n\n| file | problem |\n|---|---|\n{rows}\n",
        description=f"{len(outcome['problems'])} problem(s); manifest at {outcome['manifest']}",
    )
    return outcome


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flows.prepare", description="Import and validate an image dataset once."
    )
    p.add_argument("--source", required=True, help="class folders, a Stanford Cars devkit, or a manifest.csv")
    p.add_argument("--dest", required=True, help="folder for manifest.csv, summary.json and problems.csv")
    p.add_argument("--format", default="auto", choices=FORMATS, help="how to read --source (default: auto)")
    p.add_argument(
        "--crop", choices=open_mod.CROPS, help="bbox = crop to annotated boxes (devkit); default: the source's own"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    open_mod.open_dataset(args.source, args.format, args.crop)  # a bad --source/--format: one line, before Prefect
    outcome = prepare_flow(args.source, args.dest, args.format, args.crop)
    print(f"{outcome['images']} images in {outcome['classes']} classes, {len(outcome['problems'])} problem(s)")
    print(f"manifest: {outcome['manifest']}\nproblems: {outcome['problems_file']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
