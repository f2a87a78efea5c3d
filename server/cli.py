"""`janus-server serve` and `janus-server download`.

Every Settings field is also a `serve` flag (--max-queue for max_queue);
a flag given on the command line wins over the JANUS_* environment variable.
"""
from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import SecretStr, ValidationError

from server.settings import Settings


def flag_options(annotation: Any) -> dict[str, Any]:
    """argparse options for a Settings field of this type; lists are comma-separated strings."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is Literal:
        return {"choices": typing.get_args(annotation)}
    if annotation in (int, float):
        return {"type": annotation}
    if annotation is SecretStr or annotation is str:
        return {"type": str}
    return {"type": str, "metavar": "A,B"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="janus-server", description="DeepSeek Janus inference server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Serve the HTTP API.")
    for name, field in Settings.model_fields.items():
        serve.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
            help=f"{field.description} [env JANUS_{name.upper()}]", **flag_options(field.annotation),
        )
    download = commands.add_parser("download", help="Download a model into the model folder and exit.")
    download.add_argument("--model", default=Settings.model_fields["model"].default, help="Model id.")
    download.add_argument("--home", default=None, help="Model cache folder [env JANUS_HOME].")
    download.add_argument(
        "--source", default=None, help="paddlenlp, hf, or an order such as hf,paddlenlp [env JANUS_MODEL_SOURCE]."
    )
    check = commands.add_parser(
        "check", help="Run the golden set and time the decode step on this machine's device; write a JSON report.")
    check.add_argument("--device", default="auto", help="auto (the first GPU, else the CPU), cpu, or a GPU index.")
    check.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: bfloat16 on GPU, float32 on CPU (as serve loads the model).")
    check.add_argument("--golden", default=None, help="The golden set's folder (found by itself in a checkout "
                       "and in the container images) [env JANUS_GOLDEN].")
    check.add_argument("--rows", default="2,32", help="Batch rows to time the step at (one image is 2 rows).")
    check.add_argument("--cached", type=int, default=64, help="Positions already in the cache when timing.")
    check.add_argument("--layers", type=int, default=None,
                       help="Time this many of Janus-1.3B's 24 layers (default all; fewer for a quick look).")
    check.add_argument("--rounds", type=int, default=5, help="Timed steps per figure (the median is reported).")
    check.add_argument("--no-timing", action="store_true", help="Only the golden set.")
    check.add_argument("--report", default="janus-check.json", help="Where to write the JSON report.")
    return parser


def check(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # importing Paddle would pin it to 1
    from model.selfcheck import run

    try:
        return run(args)
    except (FileNotFoundError, RuntimeError) as error:
        print(f"janus-server check: {error}", file=sys.stderr)
        return 2


def serve(settings: Settings) -> None:
    from server.app import create_app
    from server.http import Server, uvicorn_config
    from server.logging import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    # SIGTERM starts a graceful shutdown; the app's lifespan then drains and stops the engine
    Server(uvicorn_config(create_app(settings), settings)).run()


def download(model: str, home: str | None, source: str | None) -> int:
    from model.hub import HubError, download_model

    from server.logging import configure_logging

    configure_logging("info", json_lines=False)
    try:
        print(download_model(model, home, source))
    except HubError as error:
        print(f"janus-server download: {error}", file=sys.stderr)
        return 1
    return 0


def serve_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags given on the command line on top."""
    flags = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    return Settings(**flags)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "download":
        return download(args.model, args.home, args.source)
    if args.command == "check":
        return check(args)
    try:
        settings = serve_settings(args)
    except ValidationError as error:
        print(f"janus-server serve: invalid settings\n{error}", file=sys.stderr)
        return 2
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
