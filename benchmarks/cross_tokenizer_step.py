"""Step time and peak memory of a cross-tokenizer KD step (``uld``, ``aligned_kl``) against
``forward_kl`` on a same-tokenizer pair of models of the same size.

Models: random Llama models built from a config (no download): a student and a teacher with
``--student-layers`` / ``--teacher-layers`` layers, ``--hidden`` width and
``--student-vocab`` / ``--teacher-vocab`` tokens. The ``forward_kl`` baseline gives the
teacher the student's vocabulary (same tokenizer); the cross-tokenizer variants give it
``--teacher-vocab`` (by default the same size, so the two pairs cost the same in every layer
and lm_head and only the loss differs; pass ``--teacher-vocab 151936`` for a Qwen-width
teacher).

Batches: ``--batch`` × ``--seq`` random token ids per side, the first half of each row a
prompt and the second half the response. Same tokenizer: the KD positions are the response
positions (``response_mask``). Cross tokenizer: ``--aligned-share`` of the student's response
positions are paired, in order, with as many of the teacher's (a random monotone alignment,
as :class:`kdlab.data.alignment.CrossTokenizerCollator` produces), ``--matched-share`` of the
pairs matched, and ``--shared-share`` of the smaller vocabulary shared (random id pairs).

A step: the teacher's decoder under ``torch.inference_mode``
(:func:`kdlab.training.forward.teacher_hidden_states`), the student's final hidden states,
the KD loss from hidden states and lm_heads (chunked), backward, and an AdamW step on every
student parameter (full fine-tuning, so the student's lm_head weight gets its gradient
through the chunked loss too). T = 1, ``reduction="sequence"``, no CE term.

Each variant runs in a fresh subprocess: one untimed warm-up step (it also allocates the
optimizer state), then ``--repeats`` timed steps (median reported). Peak memory is measured
over the timed steps above the state after the warm-up, with ``loss_memory.py``'s meter
(RSS high-water mark on CPU, ``max_memory_allocated`` on CUDA).

Usage::

    python benchmarks/cross_tokenizer_step.py                   # hidden 576, vocab 49,152
    python benchmarks/cross_tokenizer_step.py --tiny            # seconds: proves it runs
    python benchmarks/cross_tokenizer_step.py --device cuda --dtype bfloat16 --batch 8 \\
        --seq 1024 --teacher-vocab 151936 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import kdlab  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdlab.losses import (
    HiddenStates,
    KDLossSpec,
    SharedVocabulary,
    TokenAlignment,
    chunked_distillation_loss,
    cross_tokenizer_loss,
)
from kdlab.training.forward import (
    final_hidden_states,
    output_projection,
    response_mask,
    teacher_hidden_states,
)
from loss_memory import _PeakMeter

VARIANTS = ("forward_kl", "uld", "aligned_kl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_model(vocab: int, layers: int, hidden: int, seed: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 192),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def random_batch(batch: int, seq: int, vocab: int, generator: torch.Generator) -> dict:
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels = input_ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def random_alignment(
    student_kd: torch.Tensor, teacher_kd: torch.Tensor, args, generator: torch.Generator
) -> TokenAlignment:
    """Pair ``aligned_share`` of each row's student KD positions with as many teacher ones."""
    student_mask = torch.zeros_like(student_kd)
    teacher_mask = torch.zeros_like(teacher_kd)
    for row in range(student_kd.shape[0]):
        student_positions = student_kd[row].nonzero().squeeze(-1)
        teacher_positions = teacher_kd[row].nonzero().squeeze(-1)
        count = min(int(args.aligned_share * len(student_positions)), len(teacher_positions))
        for mask, positions in (
            (student_mask, student_positions),
            (teacher_mask, teacher_positions),
        ):
            chosen = torch.randperm(len(positions), generator=generator)[:count].sort().values
            mask[row, positions[chosen]] = True
    matched = student_mask & (
        torch.rand(student_mask.shape, generator=generator) < args.matched_share
    )
    return TokenAlignment(student_mask, teacher_mask, matched)


def random_vocabulary(student_vocab: int, teacher_vocab: int, share: float, generator):
    shared = int(share * min(student_vocab, teacher_vocab))
    return SharedVocabulary(
        torch.randperm(student_vocab, generator=generator)[:shared],
        torch.randperm(teacher_vocab, generator=generator)[:shared],
        student_vocab,
        teacher_vocab,
    )


def run_child(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    variant = args.child
    teacher_vocab = args.student_vocab if variant == "forward_kl" else args.teacher_vocab
    student = build_model(args.student_vocab, args.student_layers, args.hidden, 0, device, dtype)
    teacher = build_model(teacher_vocab, args.teacher_layers, args.hidden, 1, device, dtype)
    teacher.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)

    def make_step_inputs() -> dict:
        student_batch = random_batch(args.batch, args.seq, args.student_vocab, generator)
        if variant == "forward_kl":
            mask = response_mask(student_batch["labels"])
            return {"student": student_batch, "teacher": student_batch, "mask": mask}
        teacher_batch = random_batch(args.batch, args.seq, teacher_vocab, generator)
        alignment = random_alignment(
            response_mask(student_batch["labels"]),
            response_mask(teacher_batch["labels"]),
            args,
            generator,
        )
        return {"student": student_batch, "teacher": teacher_batch, "alignment": alignment}

    vocabulary = random_vocabulary(args.student_vocab, teacher_vocab, args.shared_share, generator)
    steps = [make_step_inputs() for _ in range(1 + args.repeats)]

    def to_device(batch: dict) -> dict:
        return {key: value.to(device) for key, value in batch.items()}

    def step(inputs: dict) -> tuple[float, int]:
        student_batch, teacher_batch = to_device(inputs["student"]), to_device(inputs["teacher"])
        with torch.inference_mode():
            teacher_hidden = teacher_hidden_states(
                teacher, teacher_batch["input_ids"], teacher_batch["attention_mask"]
            )
        student_hidden = final_hidden_states(
            student, student_batch["input_ids"], student_batch["attention_mask"]
        )
        weight, bias = output_projection(student)
        teacher_weight, teacher_bias = output_projection(teacher)
        student_hidden = student_hidden.to(weight.dtype)
        if variant == "forward_kl":
            mask = inputs["mask"].to(device)
            loss = chunked_distillation_loss(
                HiddenStates(student_hidden, weight, bias),
                HiddenStates(teacher_hidden, teacher_weight, teacher_bias),
                mask,
                KDLossSpec("forward_kl", reduction="sequence"),
                chunk_size=args.chunk_size,
            )
            rows = int(mask.sum())
        else:
            alignment = inputs["alignment"]
            alignment = TokenAlignment(
                *(
                    tensor.to(device)
                    for tensor in (
                        alignment.student_mask,
                        alignment.teacher_mask,
                        alignment.matched,
                    )
                )
            )
            loss = cross_tokenizer_loss(
                HiddenStates(student_hidden, weight, bias),
                HiddenStates(teacher_hidden, teacher_weight, teacher_bias),
                alignment,
                vocabulary,
                KDLossSpec(variant, reduction="sequence"),
                chunk_size=args.chunk_size,
            )
            rows = int(alignment.student_mask.sum())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), rows

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step(steps[0])  # warm-up (allocates AdamW's state)
    meter = _PeakMeter(device)
    times = []
    losses = []
    rows = 0
    for inputs in steps[1:]:
        synchronize()
        start = time.perf_counter()
        loss, rows = step(inputs)
        synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss)
    return {
        "variant": variant,
        "teacher_vocab": teacher_vocab,
        "kd_rows": rows,
        "time_s": statistics.median(times),
        "min_time_s": min(times),
        "peak_mib": meter.peak_mib(),
        "exact_peak": meter.exact,
        "loss": losses[-1],
    }


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", variant]
    for name in CHILD_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


CHILD_OPTIONS = (
    "device",
    "dtype",
    "threads",
    "batch",
    "seq",
    "hidden",
    "student_layers",
    "teacher_layers",
    "student_vocab",
    "teacher_vocab",
    "aligned_share",
    "matched_share",
    "shared_share",
    "chunk_size",
    "repeats",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models, 2 steps: a smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--teacher-layers", type=int, default=8)
    parser.add_argument("--student-vocab", type=int, default=49_152)
    parser.add_argument("--teacher-vocab", type=int, default=None, help="default: student's")
    parser.add_argument("--aligned-share", type=float, default=0.85)
    parser.add_argument("--matched-share", type=float, default=0.8)
    parser.add_argument("--shared-share", type=float, default=0.6)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: kdlab's auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.seq, args.hidden = 2, 32, 64
        args.student_layers, args.teacher_layers = 1, 2
        args.student_vocab, args.teacher_vocab = 512, args.teacher_vocab or 640
        args.repeats = 2
    if args.teacher_vocab is None:
        args.teacher_vocab = args.student_vocab

    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(run_child(args)))
        return

    device_name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"CPU, {args.threads} threads"
    )
    print(
        f"batch×seq = {args.batch}×{args.seq} per side, hidden {args.hidden}, student "
        f"{args.student_layers} layers / vocab {args.student_vocab:,}, teacher "
        f"{args.teacher_layers} layers / vocab {args.teacher_vocab:,} (forward_kl: "
        f"{args.student_vocab:,}), {args.dtype}, {device_name}, torch {torch.__version__}; "
        f"aligned {args.aligned_share:.0%} of response positions, matched "
        f"{args.matched_share:.0%}, shared vocabulary {args.shared_share:.0%}; median of "
        f"{args.repeats} steps after 1 warm-up\n"
    )
    print(
        "| variant | teacher vocab | KD rows | step (s) | × forward_kl | peak (MiB) | × forward_kl | loss |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    results = [run_variant(variant, args) for variant in args.variants]
    baseline = next((r for r in results if r["variant"] == "forward_kl"), None)
    for result in results:
        time_ratio = peak_ratio = "–"
        if baseline is not None:
            time_ratio = f"{result['time_s'] / baseline['time_s']:.2f}"
            if baseline["peak_mib"] > 0:
                peak_ratio = f"{result['peak_mib'] / baseline['peak_mib']:.2f}"
        print(
            f"| {result['variant']} | {result['teacher_vocab']:,} | {result['kd_rows']} "
            f"| {result['time_s']:.3f} | {time_ratio} | {result['peak_mib']:.0f} "
            f"| {peak_ratio} | {result['loss']:.4f} |",
            flush=True,
        )
    if not all(result["exact_peak"] for result in results):
        print("(peak from ru_maxrss: /proc/self/clear_refs unavailable)")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": results}, indent=2)
        )


if __name__ == "__main__":
    main()
