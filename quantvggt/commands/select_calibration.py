"""``quantvggt select-calibration``: choose a calibration set with Noise-Filtered Diverse Sampling."""

from __future__ import annotations

import argparse

from quantvggt.calib.nfds import check_selection_output, main, read_manifest


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``quantvggt select-calibration``."""
    parser.add_argument("pool", nargs="+", help="scene folders, folders of scene folders, or a .csv/.parquet manifest")
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, help="manifest .parquet (a .png plot is written beside it)")
    parser.add_argument("--clusters", type=int, default=5)
    parser.add_argument("--per-cluster", type=int, default=4)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Run NFDS over a pool of scenes and write the selection manifest (+ PNG)."""
    from tqdm import tqdm

    from quantvggt.quant.load import load_model

    check_selection_output(args.out, args.pool)  # before the model: never onto or inside an input
    model = load_model(args.model)
    out = main(
        model,
        args.pool,
        args.out,
        frames=args.frames,
        n_clusters=args.clusters,
        per_cluster=args.per_cluster,
        seed=args.seed,
        overwrite=True,
        progress=lambda xs: tqdm(xs, desc="statistics", unit="sample"),
    )
    rows = read_manifest(out)
    selected, filtered = sum(r["selected"] for r in rows), sum(r["outlier"] for r in rows)
    print(f"{selected} selected of {len(rows)} candidates; {filtered} filtered as outliers")
    for r in rows:
        if r["outlier"]:
            print(f"  filtered {r['sample_id']}: {r['outlier_reason']}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0
