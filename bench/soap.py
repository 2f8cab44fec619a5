"""SOAP adapter cost per record against a raw zeep call on the same response (same run).

Both sides call the simulator's ``GetOrdersSince`` for the same 100-record page over real HTTP:
raw zeep returns zeep objects; the adapter returns JSON-safe records (conversion, hardened
parsing, the refusing transport and the operation deadline included). Goal: ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zeep  # noqa: E402

from adapters.soap import SoapSource  # noqa: E402
from adapters.soap.simulator import T0, SoapSimulator  # noqa: E402


def per_record(fns: dict[str, Callable[[], None]], records: int, rounds: int) -> dict[str, float]:
    """Median seconds per record of each function; rounds alternate between them so machine noise
    (other processes, CPU frequency) hits both sides alike."""
    for fn in fns.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) / records)
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--page", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    with SoapSimulator() as sim:
        sim.add_orders(args.page)
        client = zeep.Client(sim.wsdl_url)
        since = T0.replace(year=T0.year - 1)

        def raw() -> None:
            out = client.service.GetOrdersSince(since=since, pageToken=None, pageSize=args.page)
            assert len(out["orders"]) == args.page

        cfg = SoapSource.parse_config({
            "wsdl": sim.wsdl_url, "operation": "GetOrdersSince",
            "arguments": {"since": "{cursor.time}", "pageToken": "{page_token}", "pageSize": "{page_size}"},
            "records_path": "orders", "next_page_token_path": "nextPageToken",
            "key_field": "id", "time_field": "updatedAt", "page_size": args.page,
        })
        adapter = SoapSource(cfg, source_name="bench")  # type: ignore[arg-type]
        adapter.open()

        def ours() -> None:
            batch = adapter.fetch(None, args.page)
            assert len(batch.records) == args.page

        medians = per_record({"raw": raw, "ours": ours}, args.page, args.rounds)
        raw_s, our_s = medians["raw"], medians["ours"]
        adapter.close()
    print(f"\n## SOAP adapter vs raw zeep ({args.page} records per call, median of {args.rounds})\n")
    print("| path | µs per record |")
    print("|---|---:|")
    print(f"| raw zeep call (zeep objects) | {raw_s * 1e6:.1f} |")
    print(f"| gateway SOAP adapter fetch (JSON-safe records, hardened) | {our_s * 1e6:.1f} |")
    print(f"\nratio adapter / raw zeep: **{our_s / raw_s:.2f}** (goal <= 1.2)")


if __name__ == "__main__":
    main()
