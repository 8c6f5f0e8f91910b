"""Change a running server's settings from the shell (``PUT /v2/settings/{model}``, an extension of the
Open Inference Protocol that needs the server's admin token: ``--token`` or ``SERVE_ADMIN_TOKEN``).

    python -m serve.cli triage auto --model cascade             # off | on | auto
    python -m serve.cli triage on --level 2 --model skipnet38
    python -m serve.cli batching --model cascade max_batch_size=128 adaptive=true
    python -m serve.cli show                                    # every model's settings
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    p.add_argument("--token", default=os.environ.get("SERVE_ADMIN_TOKEN"),
                   help="the server's admin token (default: $SERVE_ADMIN_TOKEN)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("triage", help="set the triage mode")
    t.add_argument("mode", choices=["off", "on", "auto"])
    t.add_argument("--model", required=True)
    t.add_argument("--level", type=int, help="the level for mode 'on'")
    b = sub.add_parser("batching", help="set batching knobs: key=value ...")
    b.add_argument("--model", required=True)
    b.add_argument("knobs", nargs="+", metavar="key=value")
    sub.add_parser("show", help="print every model's settings")
    args = p.parse_args(argv)
    try:
        auth = {"Authorization": f"Bearer {args.token}"} if args.token else {}
        with httpx.Client(base_url=args.url, timeout=10, headers=auth) as client:
            if args.command == "show":
                r = client.get("/v2/settings")
            elif args.command == "triage":
                body = {"mode": args.mode, **({"level": args.level} if args.level is not None else {})}
                r = client.put(f"/v2/settings/{args.model}", json={"triage": body})
            else:
                knobs = {}
                for kv in args.knobs:
                    if "=" not in kv:
                        print(f"error: {kv!r} is not key=value", file=sys.stderr)
                        return 2
                    k, v = kv.split("=", 1)
                    knobs[k] = _value(v)
                r = client.put(f"/v2/settings/{args.model}", json={"batching": knobs})
    except httpx.HTTPError as e:
        print(f"error: cannot reach {args.url}: {e}; is `python -m experiments.serve` running?", file=sys.stderr)
        return 2
    if r.status_code >= 400:
        try:
            why = r.json().get("error", r.text)
        except ValueError:
            why = r.text
        print(f"error: {r.status_code}: {why}", file=sys.stderr)
        return 2
    print(json.dumps(r.json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
