"""`isara serve`, `isara worker` and `isara chat`: a model (or a run's) served, or talked to."""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

import click

from loop.cli.common import SERVER_KEYS, cli, console, err_console, iteration_option, runs_dir_option, server_options, \
    target_of


@cli.command()
@click.argument("model", metavar="MODEL|RUN")
@iteration_option
@runs_dir_option
@server_options(*SERVER_KEYS, "backend", port={"default": 8080})
def serve(model, iteration, runs_dir, host, port, api_key, slots, ctx_per_slot, threads, backend) -> None:
    """Serve a model, or a run's latest model, on an OpenAI-compatible endpoint until Ctrl-C.

    MODEL is a catalog name, a .gguf file or a folder holding one; RUN is a
    run folder or name (its latest exported iteration, or --iteration).

    \b
    Example:
      isara serve safety --port 8080            # the aligned model of runs/safety
      isara serve smollm2-135m --port 8080
      curl http://127.0.0.1:8080/v1/chat/completions -d '{"messages":[{"role":"user","content":"Hi"}]}'
    """
    from server.process import ServerSettings

    t = target_of(model, runs_dir, iteration)
    # Clients see the model under its label (`safety/iter-03`, `smollm2-135m`), not this machine's file path.
    settings = ServerSettings(model=t.gguf, lora=t.lora, host=host, port=port, api_key=api_key, slots=slots,
                              ctx_per_slot=ctx_per_slot, threads=threads, backend=backend, alias=t.label)
    _serve_until_stopped(settings, lambda srv: f"serving {t.label} ({t.gguf.name}) at {srv.base_url}/v1 as model "
                                                 f"\"{t.label}\" ({srv.backend}, {srv.slots} slots)")


@cli.command()
@click.option("--models-root", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The folder runs write their models to, as this host sees it: every NAME.gguf or "
                   "NAME/model.gguf there is a model a run loads by NAME.")
@server_options(*SERVER_KEYS, port={"default": 8090}, slots={
    "default": 8, "help": "Parallel sequences of each loaded model (continuous batching)."}, api_key={
    "help": "Required off loopback: with the load endpoints, a client decides what this host serves."})
def worker(models_root, host, port, api_key, slots, ctx_per_slot, threads) -> None:
    """Serve, on this host, the models runs write to a shared folder, until Ctrl-C.

    A generation worker: llama-server in router mode. It serves no model of
    its own; a run loads each iteration's model by name, names it in every
    request, and unloads the one before. Models reach the worker through
    storage both hosts see; MODELS_ROOT is that folder as this host sees it.

    \b
    Example:  (on the worker host; /mnt/isara-models is shared with the run's host)
      isara worker --models-root /mnt/isara-models --host 0.0.0.0 --api-key $KEY
    """
    from server.process import ServerSettings

    settings = ServerSettings(model=None, models_dir=models_root, host=host, port=port, api_key=api_key,
                              slots=slots, ctx_per_slot=ctx_per_slot, threads=threads)
    # The root URL, as a run's generation.workers takes it (the router's load endpoints are not under /v1).
    _serve_until_stopped(settings, lambda srv: f"worker at {srv.base_url} serving the models in {models_root} "
                                               f"by name ({srv.slots} slots each)")


def _serve_until_stopped(settings, ready_line) -> None:
    """Start the server, print `ready_line(server)` once it answers, and serve until SIGINT or SIGTERM; a server
    that dies on its own exits 1 naming its log."""
    from server.process import ManagedServer

    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    # From before the server starts to its stop, SIGINT raises KeyboardInterrupt and SIGTERM sets the flag, so
    # a client that sees the server answer can stop it whatever line the signal lands on. SIGINT's handler is
    # set even where the process inherited SIGINT ignored (a background job of a non-interactive shell: Python
    # then installs none, and serve ran on through Ctrl-C).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop)
    srv = ManagedServer(settings)
    try:
        srv.start()
        # one line whatever the width: scripts wait for it and read the URL from it
        console.print(f"{ready_line(srv)}; log {srv.log_path}; Ctrl-C stops", highlight=False, soft_wrap=True)
        while not stop and srv.alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        stop = True
    finally:
        died = not srv.alive() and not stop
        srv.stop()
    if died:
        err_console.print(f"isara: error: the server exited; see {srv.log_path}")
        sys.exit(1)


@cli.command()
@click.argument("target", metavar="MODEL|RUN")
@click.option("-m", "--message", "messages", multiple=True,
              help="Send this message and print the answer, no prompt (repeatable: one conversation).")
@iteration_option
@runs_dir_option
@click.option("--max-tokens", type=click.IntRange(1, 8192), default=512, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.7, show_default=True)
def chat(target, messages, iteration, runs_dir, max_tokens, temperature) -> None:
    """Talk to a model, or a run's latest model, with its chat template; answers stream.

    Lines typed at the prompt are your turns; /reset forgets the conversation,
    /exit (or Ctrl-D) leaves.

    \b
    Example:
      isara chat safety                 # the latest iteration of runs/safety
      isara chat smollm2-135m -m "How do I sharpen a kitchen knife?"
    """
    import asyncio

    from server.client import InferenceClient
    from server.process import ManagedServer, ServerSettings


    t = target_of(target, runs_dir, iteration)
    log = (t.run_dir or Path(tempfile.gettempdir())) / "chat.server.log"
    srv = ManagedServer(ServerSettings(model=t.gguf, lora=t.lora, slots=1, log_path=log)).start()
    history: list[dict] = []

    async def turn(text: str) -> None:
        history.append({"role": "user", "content": text})
        pieces = []
        async with InferenceClient.for_servers([srv], timeout=600) as client:
            async for piece in client.stream_chat(history, max_tokens=max_tokens, temperature=temperature):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces)})

    try:
        if messages:
            for text in messages:
                asyncio.run(turn(text))
            return
        console.print(f"chatting with {t.label} ({srv.backend} llama-server); /reset, /exit", highlight=False)
        while True:
            try:
                text = input("you> ").strip()
            except EOFError:
                break
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history.clear()
                continue
            if text:
                asyncio.run(turn(text))
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
