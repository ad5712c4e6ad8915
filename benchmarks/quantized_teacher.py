"""A quantized teacher vs the fp32 one: memory, forward time, and the KD loss error it costs.

Teacher ``smollm2-135m`` (30 layers, vocab 49,152) at every setting available on the device,
student its last 10 layers (``slice_layers: 10``, untrained: LoRA at init is the slice
itself). Data: real batches of ``shared/data/train/math_cot_3k.json`` (``--data``; the
generated arithmetic set when absent), alpaca template, response positions, forward KL,
T = 1 — what ``kdlab distill`` computes.

Settings: on CPU ``fp32`` (the reference), ``bf16``, ``8bit`` (torchao int8 weight-only),
and ``4bit-*`` only where bitsandbytes is installed; on CUDA ``fp32``, ``bf16``, ``8bit``
(bitsandbytes LLM.int8) and ``4bit-nf4`` / ``4bit-nf4-dq`` (double quantization) /
``4bit-fp4`` (bitsandbytes, bf16 compute).

Columns:

- weights MiB: bytes the parameters hold, quantized tensors by their storage
  (:func:`kdlab.models.quantization.quantized_weight_bytes`);
- resident / peak MiB: CPU — a fresh subprocess per setting: RSS after loading (garbage
  collected, ``malloc_trim``; every weight read once) as anonymous + file-backed pages, and
  the high-water mark of load + one forward pass, all above the RSS before loading. File
  pages are the safetensors file's page cache, mapped while any unquantized tensor (the
  embedding, the norms) still views it: clean, reclaimable and shared, but counted in RSS
  (an 8-bit load reads the whole fp32 file to quantize it). Anonymous pages are what the
  teacher holds privately. CUDA — ``memory_allocated`` after loading (as anon) and
  ``max_memory_allocated`` over load + forward;
- forward s: median over ``--repeats`` of one batch's teacher forward as a KD step runs it
  (decoder, then the lm_head on the response rows, ``inference_mode``), × fp32 its ratio to
  fp32's. Teachers are loaded one at a time (a big one does not fit twice), so their
  timings are not interleaved: on a shared machine, rerun and compare;
- KD rel. error: mean over batches of |KD(quantized teacher) − KD(fp32 teacher)| / KD(fp32)
  with the same student and batches (max in brackets);
- KL(fp32 ‖ q): mean over response positions of the divergence between the two teachers'
  own next-token distributions (nats), and top-1 agreement.

Usage::

    python benchmarks/quantized_teacher.py                    # 8 batches of 4 × ≤ 256 tokens
    python benchmarks/quantized_teacher.py --batches 1 --batch 2 --cutoff 64 --repeats 1
    python benchmarks/quantized_teacher.py --settings fp32,8bit --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kdlab.config.schema import DistillSettings, ModelConfig
from kdlab.data.records import load_records
from kdlab.data.tokenize import Collator, TokenizeOptions, tokenize_records
from kdlab.models.loading import load_model_and_tokenizer, load_tokenizer, select_device
from kdlab.models.quantization import quantized_weight_bytes
from kdlab.training.objectives import (
    DistillationObjective,
    kd_loss_mask,
    output_projection,
    teacher_hidden_states,
)

logger = logging.getLogger("quantized_teacher")
ROOT = Path(__file__).resolve().parents[1]
TEACHER = "smollm2-135m"
STUDENT_LAYERS = 10
DATA = ROOT.parent / "shared" / "data" / "train" / "math_cot_3k.json"
#: setting → ModelConfig fields (besides the model). ``fp32`` is the reference.
SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "8bit": {"quantization": "8bit"},
    "4bit-nf4": {"quantization": "4bit", "quantization_4bit_type": "nf4"},
    "4bit-nf4-dq": {
        "quantization": "4bit",
        "quantization_4bit_type": "nf4",
        "quantization_4bit_double": True,
    },
    "4bit-fp4": {"quantization": "4bit", "quantization_4bit_type": "fp4"},
}


def available_settings(device: torch.device) -> list[str]:
    """The settings this device can run: 4-bit needs bitsandbytes, CPU 8-bit needs torchao."""
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    has_torchao = importlib.util.find_spec("torchao") is not None
    names = ["fp32", "bf16"]
    if (device.type == "cuda" and has_bnb) or (device.type == "cpu" and has_torchao):
        names.append("8bit")
    if has_bnb:
        names += ["4bit-nf4", "4bit-nf4-dq", "4bit-fp4"]
    return names


def teacher_config(setting: str, device: torch.device) -> ModelConfig:
    fields = dict(SETTINGS[setting])
    if device.type == "cuda" and "quantization" in fields:
        fields.setdefault("dtype", "bfloat16")  # the GPU path: bf16 around the int weights
    return ModelConfig(name_or_path=TEACHER, device=str(device), **fields)


def load_batches(data: Path | None, tokenizer: Any, batches: int, batch: int, cutoff: int):
    source = str(data) if data and data.is_file() else "generated:arithmetic?split=train&n=256"
    examples = tokenize_records(load_records(source), tokenizer, TokenizeOptions(cutoff_len=cutoff))
    # a prompt longer than the cutoff leaves no response position: no KD term to compare
    examples = [e for e in examples if any(label != -100 for label in e["labels"][1:])]
    examples = examples[: batches * batch]
    collate = Collator(tokenizer.pad_token_id)
    return source, [collate(examples[i * batch : (i + 1) * batch]) for i in range(batches)]


def teacher_forward(teacher: Any, batch: dict[str, torch.Tensor], device: torch.device):
    """Decoder + lm_head on the response rows: ``[rows, vocab]`` float32 log-probabilities."""
    mask = kd_loss_mask(batch["attention_mask"], batch["labels"], "response").to(device)
    with torch.inference_mode():
        hidden = teacher_hidden_states(
            teacher, batch["input_ids"].to(device), batch["attention_mask"].to(device)
        )
        weight, bias = output_projection(teacher)
        logits = torch.nn.functional.linear(hidden[mask], weight, bias)
    return logits.float().log_softmax(-1)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = select_device(args.device)
    settings = [s for s in args.settings.split(",") if s] if args.settings else None
    names = settings or available_settings(device)
    if "fp32" not in names:
        names = ["fp32", *names]
    student, tokenizer = load_model_and_tokenizer(
        ModelConfig(name_or_path=TEACHER, slice_layers=STUDENT_LAYERS, dtype="float32"),
        device=device,
    )
    source, batches = load_batches(args.data, tokenizer, args.batches, args.batch, args.cutoff)
    vocab = student.get_output_embeddings().weight.shape[0]
    rows: dict[str, dict[str, Any]] = {}
    kd: dict[str, list[float]] = {}
    reference: list[torch.Tensor] = []
    times: dict[str, list[float]] = {}
    for name in names:
        teacher, _ = load_model_and_tokenizer(teacher_config(name, device), device=device)
        objective = DistillationObjective(
            settings=DistillSettings(method="forward_kl"),
            teacher=teacher,
            tokenizer=tokenizer,
            vocab_size=vocab,
            seed=0,
            cutoff_len=args.cutoff,
            unwrap=lambda model: model,
        )
        with torch.no_grad():
            kd[name] = [
                float(objective(student, {k: v.to(device) for k, v in b.items()}, False).kd)
                for b in batches
            ]
        kl, agree, positions = 0.0, 0, 0
        for index, batch in enumerate(batches):
            logprobs = teacher_forward(teacher, batch, device)
            if name == "fp32":
                reference.append(logprobs.cpu())
                continue
            ref = reference[index].to(device)
            kl += float((ref.exp() * (ref - logprobs)).sum(-1).sum())
            agree += int((ref.argmax(-1) == logprobs.argmax(-1)).sum())
            positions += ref.shape[0]
        teacher_forward(teacher, batches[0], device)  # warm-up
        times[name] = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            teacher_forward(teacher, batches[0], device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
        errors = [abs(q - f) / f for q, f in zip(kd[name], kd["fp32"])]
        rows[name] = {
            "weights_mib": quantized_weight_bytes(teacher) / 2**20,
            "forward_s": statistics.median(times[name]),
            "kd_rel_error_mean": statistics.fmean(errors),
            "kd_rel_error_max": max(errors),
            "kd_mean": statistics.fmean(kd[name]),
            "kl_fp32_q": kl / positions if positions else 0.0,
            "top1_agreement": agree / positions if positions else 1.0,
        }
        logger.info("%s: %s", name, rows[name])
        del teacher, objective
        gc.collect()
    for name in names:
        rows[name]["forward_x_fp32"] = rows[name]["forward_s"] / rows["fp32"]["forward_s"]
    if not args.no_memory:
        for name in names:
            rows[name].update(memory(name, device, args.data))
    return {
        "device": str(device),
        "data": Path(source).name,
        "batches": args.batches,
        "batch": args.batch,
        "cutoff": args.cutoff,
        "response_positions": sum(r.shape[0] for r in reference),
        "settings": rows,
    }


def memory(setting: str, device: torch.device, data: Path | None) -> dict[str, float]:
    """Resident and peak memory of loading ``setting`` and one forward, in a fresh process."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", setting]
    command += ["--device", str(device), *(["--data", str(data)] if data else [])]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory child {setting} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(setting: str, device: torch.device, data: Path | None) -> dict[str, float]:
    tokenizer = load_tokenizer(ModelConfig(name_or_path=TEACHER))
    _, batches = load_batches(data, tokenizer, 1, 4, 256)
    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        teacher, _ = load_model_and_tokenizer(teacher_config(setting, device), device=device)
        resident = torch.cuda.memory_allocated()
        teacher_forward(teacher, batches[0], device)
        peak = torch.cuda.max_memory_allocated()
        return {"anon_mib": resident / 2**20, "file_mib": 0.0, "peak_mib": peak / 2**20}
    baseline = {field: _status_kib(field) for field in ("VmRSS", "RssAnon", "RssFile")}
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    teacher, _ = load_model_and_tokenizer(teacher_config(setting, device), device=device)
    for parameter in teacher.parameters():  # mmap'd safetensors: make every weight resident
        if type(parameter) is torch.nn.Parameter:  # (quantized tensors are built in memory)
            parameter.detach().sum()
    gc.collect()
    libc.malloc_trim(0)
    anon = _status_kib("RssAnon") - baseline["RssAnon"]
    file = _status_kib("RssFile") - baseline["RssFile"]
    teacher_forward(teacher, batches[0], device)
    peak = _status_kib("VmHWM") - baseline["VmRSS"]
    return {"anon_mib": anon / 1024, "file_mib": file / 1024, "peak_mib": peak / 1024}


def render(result: dict[str, Any]) -> str:
    lines = [
        f"device {result['device']}, {result['data']}: {result['batches']} batches of "
        f"{result['batch']} × ≤ {result['cutoff']} tokens, {result['response_positions']} "
        "response positions, forward KL, T = 1",
        "",
        "| teacher | weights MiB | resident MiB anon + file | peak MiB | forward s | × fp32 "
        "| KD rel. error (max) | KL(fp32 ‖ q) | top-1 agree |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in result["settings"].items():
        resident = f"{row['anon_mib']:.0f} + {row['file_mib']:.0f}" if "anon_mib" in row else "-"
        peak = f"{row['peak_mib']:.0f}" if "peak_mib" in row else "-"
        lines.append(
            f"| {name} | {row['weights_mib']:.0f} | {resident} | {peak} | "
            f"{row['forward_s']:.3f} | {row['forward_x_fp32']:.2f} | "
            f"{100 * row['kd_rel_error_mean']:.2f} % ({100 * row['kd_rel_error_max']:.2f} %) | "
            f"{row['kl_fp32_q']:.2e} | {100 * row['top1_agreement']:.1f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--settings", help=f"comma-separated subset of {', '.join(SETTINGS)}")
    parser.add_argument("--data", type=Path, default=DATA, help="records (JSON/JSONL)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per setting")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.memory_child is None else logging.WARNING)
    if args.memory_child:
        child = memory_child(args.memory_child, select_device(args.device), args.data)
        print(json.dumps(child))
        return 0
    result = measure(args)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
