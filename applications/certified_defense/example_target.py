"""Example external classifier program: serves a deepzero checkpoint over stdin/stdout frames.

Copy this file to put your own classifier behind the defense: replace ``build_classifier`` with code
that returns a function ``x [B, C, H, W] float32 pixels in [0, 1] -> logits [B, K] float32`` and the
image shape and K, and keep ``main``. Run::

    python -m applications.certified_defense.example_target --checkpoint runs/classify/last.pt

deepzero starts it once per run with the target spec
``exec:python -m applications.certified_defense.example_target --checkpoint CKPT`` and keeps it
alive between queries. The protocol (:mod:`solvers.query`): the program first sends a handshake
declaring ``input_shape``, ``num_classes`` and ``output`` (``logits``, or ``labels`` with
``--labels-only``), then answers each image batch with one array. stdout carries only protocol
frames, so print diagnostics to stderr.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import numpy as np


Classify = Callable[[np.ndarray], np.ndarray]


def build_classifier(checkpoint: str, input_shape: tuple[int, ...] | None,
                     num_classes: int | None) -> tuple[Classify, tuple[int, ...], int]:
    """(classify, input_shape, num_classes) for a classify or defense target checkpoint."""
    import torch

    from applications.certified_defense.targets import load_checkpoint_model

    model, shape, k = load_checkpoint_model(checkpoint)     # takes [0, 1] pixels
    shape, k = input_shape or shape, num_classes or k
    if shape is None or k is None:
        raise ValueError(f"checkpoint {checkpoint} does not say its image shape or class count: "
                         "give --input-shape C,H,W and --num-classes K")

    def classify(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).float().numpy()    # [B, K] float32 logits

    return classify, tuple(shape), int(k)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve a deepzero classifier checkpoint on stdin/stdout.")
    p.add_argument("--checkpoint", required=True, help="a classify checkpoint or a defense target checkpoint")
    p.add_argument("--labels-only", action="store_true", help="answer predicted labels instead of logits")
    p.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="image shape (default: the checkpoint's)")
    p.add_argument("--num-classes", type=int, default=None, help="K (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    stdout = sys.stdout.buffer
    sys.stdout = sys.stderr          # stray prints must not corrupt the frame stream
    import torch

    from applications.certified_defense.targets import TargetError, classifier_spec
    from solvers.query import serve_query

    torch.set_num_threads(args.threads)
    try:
        shape = tuple(int(s) for s in args.input_shape.split(",")) if args.input_shape else None
        classify, shape, k = build_classifier(args.checkpoint, shape, args.num_classes)
    except (ValueError, TargetError) as exc:
        print(f"example_target: error: {exc}", file=sys.stderr)
        return 2
    if args.labels_only:
        logits = classify
        classify = lambda x: logits(x).argmax(1).astype(np.int64)   # noqa: E731 - [B] int64 labels
    return serve_query(classify, classifier_spec(shape, k, labels_only=args.labels_only), sys.stdin.buffer,
                       stdout)


if __name__ == "__main__":
    sys.exit(main())
