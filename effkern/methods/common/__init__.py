"""Plumbing every method flow shares (written once): configs with presets, the run folder (config.json, resumable
results.json, checkpoints), the standard results row, schedules, metrics and plots."""

from effkern.methods.common.config import Config, MethodConfig, arg
from effkern.methods.common.distributed import main_only
from effkern.methods.common.plots import plot_grouped_bars
from effkern.methods.common.run import (
    RunDir,
    RunFileError,
    load_state,
    read_json,
    read_safetensors,
    row,
    save_state,
    write_json,
    write_safetensors,
)
from effkern.methods.common.train import accuracy, per_class_accuracy, warmup_cosine

__all__ = ["Config", "MethodConfig", "RunDir", "RunFileError", "accuracy", "arg", "load_state", "main_only",
           "per_class_accuracy", "plot_grouped_bars", "read_json", "read_safetensors", "row", "save_state",
           "warmup_cosine", "write_json", "write_safetensors"]
