"""Tasks: each owns its batches, loss and evaluation; train.py and evaluate.py stay generic.

A task is named by its config dataclass; `build_task(cfg, ...)` finds the task class."""
from __future__ import annotations

import importlib

# config class name -> (module, task class)
REGISTRY = {
    "ClassImageConfig": ("tasks.class_image", "ClassImageTask"),
    "ClassVideoConfig": ("tasks.class_video", "ClassVideoTask"),
    "TextLMConfig": ("tasks.text_lm", "TextLMTask"),
    "MixedCaptionConfig": ("tasks.mixed_caption", "MixedCaptionTask"),
    "ClassifyConfig": ("tasks.classify", "ClassifyTask"),
    "LinearProbeConfig": ("tasks.linear_probe", "LinearProbeTask"),
}


def task_class(config_name: str):
    if config_name not in REGISTRY:
        raise KeyError(f"unknown task config {config_name!r}; known: {', '.join(REGISTRY)}")
    mod, cls = REGISTRY[config_name]
    return getattr(importlib.import_module(mod), cls)


def config_class(config_name: str):
    mod, _ = REGISTRY[config_name]
    return getattr(importlib.import_module(mod), config_name)


def build_task(cfg, rank: int = 0, world: int = 1, device="cpu"):
    return task_class(type(cfg.task).__name__)(cfg, rank, world, device)
