"""`trt-gemma` command line: parses and dispatches, nothing else.

Commands live in trt_gemma/commands/<stage>.py as thin click wrappers around one stage function each. They are
imported lazily (on use), so `trt-gemma --help` stays fast and a missing optional extra only affects its command.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click

from trt_gemma import __version__
from trt_gemma.errors import TrtGemmaError

# command name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "targets": ("trt_gemma.commands.hardware", "targets", "List the NVIDIA targets trt_gemma knows."),
    "detect": ("trt_gemma.commands.hardware", "detect", "Detect this host's NVIDIA GPU or Jetson module."),
    "doctor": ("trt_gemma.commands.doctor", "doctor", "Versions, extras and what this host can do."),
    "plan": ("trt_gemma.commands.plan", "plan", "Will a Gemma 2 model fit a target? Memory and speed estimate."),
    "convert": ("trt_gemma.commands.convert", "convert", "Hugging Face Gemma 2 -> TensorRT-LLM checkpoint."),
    "generate": ("trt_gemma.commands.generate", "generate", "Generate text on the CPU (onnxruntime or the reference)."),
    "quantize": ("trt_gemma.commands.quantize", "quantize", "INT4-AWQ / FP8 quantization through ModelOpt."),
    "eval": ("trt_gemma.commands.eval", "eval_", "Perplexity / top-1 / KL of checkpoints vs the unquantized model."),
    "export-onnx": ("trt_gemma.commands.export_onnx", "export_onnx", "Checkpoint -> standard-operator ONNX graph."),
    "build": ("trt_gemma.commands.build", "build", "Target-tuned bundle, compiled to an engine where possible."),
    "inspect": ("trt_gemma.commands.build", "inspect", "Describe bundles and engines."),
    "cache": ("trt_gemma.commands.cache", "cache", "List or prune the cache of converted models (ls, prune)."),
    "export-triton": ("trt_gemma.commands.export_triton", "export_triton",
                      "Triton Inference Server repository (TensorRT-LLM backend) + Kubernetes manifests."),
    "check": ("trt_gemma.commands.check", "check", "Check a bundle's engine on its GPU against onnxruntime CPU."),
    "serve": ("trt_gemma.commands.serve", "serve", "OpenAI-compatible server with memory telemetry."),
    "telemetry": ("trt_gemma.commands.serve", "telemetry", "Memory, power and KV-cache telemetry snapshot."),
    "moderate": ("trt_gemma.commands.moderate", "moderate", "ShieldGemma safety scores for a prompt (and response)."),
    "features": ("trt_gemma.commands.features", "features", "Gemma Scope SAE features of a text, per token."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if _available(name)]

    def get_command(self, ctx, name):
        if name not in COMMANDS or not _available(name):
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if not rows:
            return
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _available(name: str) -> bool:
    """A command whose module is not written yet is hidden rather than broken."""
    return importlib.util.find_spec(COMMANDS[name][0]) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trt-gemma")
def cli():
    """Deploy Gemma 2 on NVIDIA hardware: plan, convert, quantize, build TensorRT-LLM engines, serve."""


def main(argv=None) -> None:
    """Entry point: typed errors become a message, the fix and an exit code; never a traceback."""
    from trt_gemma.fsutil import Terminated, die_by_sigterm, raise_on_sigterm, restore_sigterm

    previous = raise_on_sigterm()  # SIGTERM cleans up like Ctrl-C (temp dirs), then ends the process as SIGTERM
    try:
        cli.main(args=argv, standalone_mode=False)
    except TrtGemmaError as e:
        click.secho(f"error: {e.message}", fg="red", err=True)
        if e.fix:
            click.echo(f"  fix: {e.fix}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Terminated:  # cleaned up on the way here; end as SIGTERM would have
        click.echo("terminated", err=True)
        die_by_sigterm()
    except Exception as e:  # a bug of ours: one line, plus how to see the traceback
        if os.environ.get("TRT_GEMMA_DEBUG"):
            raise
        click.secho(f"internal error: {type(e).__name__}: {e}", fg="red", err=True)
        click.echo("  fix: rerun with TRT_GEMMA_DEBUG=1 for the traceback and report it", err=True)
        sys.exit(1)
    finally:
        restore_sigterm(previous)
    sys.exit(0)
