"""Serve a checkpoint over an OpenAI-compatible HTTP API, with a web chat page at /.

  diyllm serve --ckpt runs/sft                        # http://127.0.0.1:8000/ (chat page), /v1/... (API)
  diyllm serve --ckpt best.pt --port 8080 --model-name mymodel --max-concurrency 8
  diyllm serve --ckpt runs/sft --host 0.0.0.0 --api-key SECRET   # reachable from other machines
  diyllm serve --ckpt runs/sft --quantize int8        # int8 weights: faster decoding on CPU
  diyllm serve --ckpt runs/sft --compile --quantize w8a8   # a compiled decode step, int8 dot products

Requests arriving together are decoded as one batch (up to --max-concurrency rows); more wait in a
first-come-first-served queue of --max-queue requests, beyond which the server answers 503.
Needs the `serve` extra: pip install -e ".[serve]".
"""

from __future__ import annotations

import argparse
import os
import sys

from diyllm.errors import UserError
from diyllm.model.quantize import QUANTIZE_CHOICES, quantized_for

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint .pt, run folder or hf:DIR")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="the model id clients see (default: from --ckpt)")
    parser.add_argument("--max-concurrency", type=int, default=16, help="rows decoded together in one batch")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a free row")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (info shows every request)")
    parser.add_argument("--compile", action="store_true",
                        help="decode through a torch.compile'd static-cache step (one graph for any number of "
                             "active rows; compiled on the first request)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                        help="int8: serve an int8-weight, bfloat16 copy of the model (CPU: ~2.5x faster decoding); "
                             "w8a8: int8 activations too (fastest with --compile)")


def default_model_name(ckpt: str) -> str:
    path = os.path.normpath(ckpt.removeprefix("hf:"))
    base = os.path.basename(path)
    if base.endswith(".pt"):
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        return f"{parent}/{base[:-3]}" if parent else base[:-3]
    return base or "diyllm"


def check_port_free(host: str, port: int) -> None:
    """Fail before loading the model, with one clear line, when the address cannot be bound."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or stop the "
                            "program using it") from None


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from diyllm.serving.app import create_app
    except ImportError as exc:
        raise UserError(f"`diyllm serve` needs the serve extra ({exc.name} is missing): "
                        'pip install -e ".[serve]"') from None
    from diyllm.serving.scheduler import BatchScheduler
    from diyllm.training.checkpoint import load_model
    from diyllm.training.device import resolve_device

    if args.max_concurrency < 1 or args.max_queue < 0:
        raise UserError("--max-concurrency must be >= 1 and --max-queue >= 0")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    check_port_free(args.host, args.port)
    model, tokenizer, _ = load_model(args.ckpt, device=resolve_device(args.device))
    if tokenizer is None:
        raise UserError(f"{args.ckpt} holds no tokenizer, so requests cannot be encoded")
    if args.quantize != "none":  # int8 weights, bf16 (int8: w8a8) activations (model/quantize.py)
        model = quantized_for(model, args.quantize)
    name = args.model_name or default_model_name(args.ckpt)
    scheduler = BatchScheduler(model, tokenizer, max_batch=args.max_concurrency, max_queue=args.max_queue,
                               compile=args.compile)
    app = create_app(scheduler, name, api_key=args.api_key)
    if args.host not in LOOPBACK and args.api_key is None:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use the "
              "model", file=sys.stderr)
    print(f"serving {name} (context {model.config.context_length} tokens, batch up to {args.max_concurrency}) "
          f"on http://{args.host}:{args.port}/  (API: /v1, Ctrl-C to stop)", flush=True)
    return serve_with_decoding_on_main_thread(
        uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)), scheduler)


def serve_with_decoding_on_main_thread(server, scheduler) -> int:
    """The HTTP server in a thread, the decode loop on this (the main) thread, which loaded the model: a
    second thread running torch's kernels would make OpenMP wake its workers for every kernel, 2-4x
    slower decoding on a few cores (BatchScheduler.run). Ctrl-C or SIGTERM stops both."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    scheduler.runs_on_caller = True  # the app's lifespan start() then leaves the decoding to us
    http = threading.Thread(target=server.run, name="diyllm-http", daemon=True)
    previous = signal.signal(signal.SIGTERM, interrupt)
    http.start()
    try:
        scheduler.run(alive=http.is_alive)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.should_exit = True
        http.join(timeout=15)
    return 0 if server.started else 1
