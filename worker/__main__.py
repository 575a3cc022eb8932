"""`python -m worker`: inspect a GGUF file, tokenize text, generate text. Errors print one line and exit 1."""

from __future__ import annotations

import argparse
import json
import sys

from worker.errors import WorkerError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="architecture, quant kind, tensors and validation result of a GGUF file")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("tokenize", help="print the token ids of TEXT (JSON)")
    p.add_argument("text")
    p.add_argument("--model", help="GGUF file or tokenizer.json (default: the embedded Gemma 3 270M)")
    p.add_argument("--special", action="store_true", help="match control tokens such as <start_of_turn>")
    p.add_argument("--no-bos", action="store_true", help="do not add BOS even where the file says to")

    p = sub.add_parser("generate", help="stream a completion of PROMPT to stdout")
    p.add_argument("--model", help="GGUF file (default: the embedded Gemma 3 270M)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")

    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            from worker.inspect import inspect_model, render

            report = inspect_model(args.model)
            print(json.dumps(report, indent=2) if args.json else render(report))
        elif args.command == "tokenize":
            from worker import default_model_path, load_tokenizer

            tok = load_tokenizer(args.model or default_model_path())
            print(json.dumps(tok.encode(args.text, add_bos=False if args.no_bos else None, special=args.special)))
        elif args.command == "generate":
            _generate(args)
    except WorkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _generate(args: argparse.Namespace) -> None:
    import worker

    model = worker.load(args.model or worker.default_model_path(), device=args.device)
    for piece in model.stream(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())
