"""SOAP adapter cost per record against a raw zeep call on the same response (same run).

Both sides call the simulator's ``GetOrdersSince`` for the same 100-record page over real HTTP:
raw zeep returns zeep objects; the adapter returns JSON-safe records (conversion, hardened
parsing, the refusing transport and the operation deadline included). Goal: ratio <= 1.2.

By default the simulator builds each answer anew (its cost is in both sides alike). With
``--canned`` it answers every call with the bytes of one recorded answer, so both sides parse the
very same response and the simulator's own work drops out: the stricter ratio of client costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zeep

from adapters.soap import SoapSource
from adapters.soap.simulator import T0, SoapSimulator


def per_record(fns: dict[str, Callable[[], None]], records: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per record of each function, one sample per round; rounds alternate between them so
    machine noise (other processes, CPU frequency) hits both sides alike."""
    for fn in fns.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) / records)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--page", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--canned", action="store_true", help="answer every call with one recorded response")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args()
    with SoapSimulator() as sim:
        sim.add_orders(args.page)
        client = zeep.Client(sim.wsdl_url)
        since = T0.replace(year=T0.year - 1)
        if args.canned:
            with client.settings(raw_response=True):
                recorded = client.service.GetOrdersSince(since=since, pageToken=None, pageSize=args.page)
            sim.serve_raw(recorded.content, content_type=recorded.headers["Content-Type"])

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

        samples = per_record({"raw": raw, "ours": ours}, args.page, args.rounds)
        raw_s, our_s = statistics.median(samples["raw"]), statistics.median(samples["ours"])
        # Robustness checks on a busy machine: each round's own ratio (both sides measured back to
        # back), and the fastest round of each side (the least disturbed).
        paired = statistics.median(o / r for o, r in zip(samples["ours"], samples["raw"], strict=True))
        fastest = min(samples["ours"]) / min(samples["raw"])
        adapter.close()
    answer = "one recorded response" if args.canned else "answers built per call"
    print(f"\n## SOAP adapter vs raw zeep ({args.page} records per call, {answer}, median of {args.rounds})\n")
    print("| path | µs per record |")
    print("|---|---:|")
    print(f"| raw zeep call (zeep objects) | {raw_s * 1e6:.1f} |")
    print(f"| gateway SOAP adapter fetch (JSON-safe records, hardened) | {our_s * 1e6:.1f} |")
    print(f"\nratio adapter / raw zeep: **{our_s / raw_s:.2f}** (goal <= 1.2)")
    print(f"median of per-round ratios: {paired:.2f}; ratio of the fastest rounds: {fastest:.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "args": {**vars(args), "json": str(args.json)}, "zeep": zeep.__version__,
            "raw_us_per_record": raw_s * 1e6, "adapter_us_per_record": our_s * 1e6,
            "ratio": our_s / raw_s, "ratio_paired_median": paired, "ratio_fastest": fastest,
        }, indent=2))


if __name__ == "__main__":
    main()
