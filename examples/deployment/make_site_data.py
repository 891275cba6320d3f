"""Write one JSON-lines data file per site from fedllm's built-in tasks, each site holding
different task families (as separate organisations would), for trying the deployment out.

    python make_site_data.py [--sites 2] [--out .]      # writes site0.jsonl, site1.jsonl, ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedllm.config import DataConfig
from fedllm.data import load_splits, partition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--per-family", type=int, default=32, help="built-in examples per task family")
    args = parser.parse_args()
    cfg = DataConfig(train_per_family=args.per_family, partition="task")
    train, _ = load_splits(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    for site in range(args.sites):
        rows = partition(train, cfg, args.sites, site)
        path = args.out / f"site{site}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{path}: {len(rows)} examples ({', '.join(sorted({r['family'] for r in rows}))})")


if __name__ == "__main__":
    main()
