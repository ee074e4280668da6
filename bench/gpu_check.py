"""The prepared GPU script: every GPU-touching path of kdtune in one go, well under ten minutes.

    python bench/gpu_check.py --out DIR [--fmnist-root PATH] [--front bench/data/real_task_front.json]
    python bench/gpu_check.py --smoke --out DIR    # the same sections on the CPU, tiny (tests run this)

It needs torch (with CUDA), numpy and this checkout's ``kdtune`` core, nothing
else: no Ray, Optuna, pydantic, pandas or torchvision is imported (the JSON says
which were, in the script and in each process it starts), which also checks
the layering (the core is plain PyTorch). Sections:

1. ``device``: the GPU, its memory, bfloat16 support.
2. ``amp``: a KD step (ResNet-8×4 student, cached teacher logits, CIFAR-shaped
   batches) in float32 and under bfloat16 autocast: samples/s of each, and the
   first epoch's training loss of both (they should agree to about 1e-2).
3. ``augment``: the batched crop + flip (:func:`kdtune.core.augment.apply_views`)
   on the device gives the CPU's pixels exactly, and its samples/s there; the
   cached-views gather (:meth:`TeacherTargets.batch`) on the device.
4. ``share``: four processes on one GPU, standing in for Ray's ``gpus: 0.25``:
   samples/s per process for ``online`` (teacher per batch) and ``views: 4``,
   with the GPU's utilisation sampled by ``nvidia-smi`` meanwhile.
5. ``real_task``: Fashion-MNIST from its ``.gz`` files on the *full* training
   split (``--fmnist-root``; skipped when absent): the VGG-8×0.5 teacher of
   search_spaces/fashion_mnist.yaml trained once with augmentation, its views
   cached (K = 4), then for each width of the CPU run's front (``--front``) one
   distilled and one hard-label ResNet-8 student, four processes at a time:
   test accuracy, samples/s per trial, GPU utilisation; the published
   hand-designed networks of similar size beside them
   (bench/data/fashion_mnist_published.json).

Writes DIR/gpu_check.json and DIR/gpu_check.md. A section that fails is
recorded with its error and the next one runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

#: Sizes per mode. On the GPU: the literature's CIFAR pair, resnet32x4 (7.43M) -> resnet8x4
#: (1.23M); in the CPU smoke run, networks small enough for a test.
SIZES = {
    "gpu": {"images": 20000, "epochs": 2, "real_teacher_epochs": 10, "real_epochs": 27, "share_procs": 4, "front_limit": None,
            "student": {"family": "resnet", "width": 4.0, "model_options": {"depth": 8}},
            "teacher": {"family": "resnet", "width": 4.0, "model_options": {"depth": 32}}},
    "smoke": {"images": 128, "epochs": 1, "real_teacher_epochs": 1, "real_epochs": 1, "share_procs": 2, "front_limit": 2,
              "student": {"family": "resnet", "width": 0.25, "model_options": {"depth": 8}},
              "teacher": {"family": "resnet", "width": 0.5, "model_options": {"depth": 8}}},
}


# --------------------------------------------------------------------------- data and runs


def synthetic_splits(images: int, seed: int = 0):
    """CIFAR-shaped random images (3×32×32, 10 classes): throughput needs no real pixels."""
    from kdtune.core.data import TensorSplit, make_splits

    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> TensorSplit:
        return TensorSplit(torch.randn(n, 3, 32, 32, generator=generator),
                           torch.randint(0, 10, (n,), generator=generator))

    return make_splits("synthetic", split(images), split(max(images // 10, 64)), split(max(images // 10, 64)),
                       num_classes=10, seed=seed, val_fraction=0.1, test_fraction=0.1, image_size=None)


def fmnist_splits(root: str):
    """Fashion-MNIST as search_spaces/fashion_mnist.yaml reads it (10% of the 60,000 for validation)."""
    from kdtune.core.data import load_dataset

    return load_dataset("fashion_mnist", root, seed=0, val_fraction=0.1)


def load_splits(source: dict[str, Any]):
    return fmnist_splits(source["root"]) if source["kind"] == "fmnist" else synthetic_splits(source["images"])


def teacher_targets(source: dict[str, Any], teacher: dict[str, Any], mode: str, cache: str, device: str,
                    augment: dict[str, Any] | None, views: int = 4):
    """The teacher's targets in ``mode`` (logits, views or online), built once and cached in ``cache``."""
    from kdtune.core.teacher import TeacherConfig, online_targets, prepare_teachers, prepare_views

    data = load_splits(source)
    config = TeacherConfig(**teacher)
    prepared = prepare_teachers([config], data, cache, device=device, log=lambda m: None)
    if mode == "online":
        targets = online_targets(prepared, [config], data)
        targets.online_model.to(device)
    elif mode == "views":
        targets = prepare_views(prepared, [config], data, augment or {}, views, device=device, log=lambda m: None)
    else:
        targets = prepared.targets
    return data, targets, prepared


def timed_run(config: dict[str, Any], data, targets) -> dict[str, Any]:
    """One :func:`kdtune.core.distill.run`; samples/s of the epochs after the first (warm-up)."""
    from kdtune.core.distill import RunConfig, run

    result = run(RunConfig(**config), data, targets)
    history = result.history
    steady = history[1:] or history
    return {"samples_per_s": float(np.mean([h["samples_per_s"] for h in steady])),
            "train_loss_epoch1": float(history[0]["train_loss"]), "val_acc": float(result.metrics["val_acc"]),
            "test_acc": evaluate_test(result.student, data, config["device"]), "params": int(result.metrics["params"])}


def evaluate_test(model, data, device: str) -> float:
    from kdtune.core.distill import evaluate

    accuracy, _ = evaluate(model, data.test, torch.device(device))
    return float(accuracy)


#: What the GPU machine lacks (and pandas, which it has but the core does not need):
#: the script reports which of these ended up imported, in itself and in every process.
NOT_ON_THE_GPU_MACHINE = ("ray", "optuna", "pydantic", "torchvision", "pandas", "yaml", "click", "sklearn", "scipy")


def imported_extras() -> list[str]:
    """Which of :data:`NOT_ON_THE_GPU_MACHINE` this process has imported."""
    loaded = {name.split(".")[0] for name in sys.modules}
    return sorted(loaded & set(NOT_ON_THE_GPU_MACHINE))


def _child(job: dict[str, Any], out: str) -> None:
    """One process of a shared-GPU wave: build its targets (cache hits), train, write its result."""
    torch.set_num_threads(max(1, job.get("threads", 1)))
    try:
        data, targets, _ = teacher_targets(job["source"], job["teacher"], job["mode"], job["cache"], job["device"],
                                           job["config"].get("augment"))
        result = {**timed_run(job["config"], data, targets), "name": job["name"]}
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        result = {"name": job["name"], "error": f"{type(exc).__name__}: {exc}"}
    Path(out).write_text(json.dumps({**result, "imported_extras": imported_extras()}))


class UtilisationSampler:
    """GPU utilisation (%) and memory (MiB) every 0.5 s from ``nvidia-smi``, while in a ``with`` block."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        command = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.wait(0.5):
            try:
                line = subprocess.run(command, capture_output=True, text=True, timeout=5).stdout.splitlines()[0]
                util, memory = (float(v) for v in line.split(","))
                self.samples.append((util, memory))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return  # no nvidia-smi (the CPU smoke run): nothing to sample

    def __enter__(self) -> "UtilisationSampler":
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_max": None, "gpu_mem_max_mib": None}
        util = [u for u, _ in self.samples]
        return {"gpu_util_mean": round(float(np.mean(util)), 1), "gpu_util_max": max(util),
                "gpu_mem_max_mib": max(m for _, m in self.samples)}


def run_wave(jobs: list[dict[str, Any]], workdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run ``jobs`` as concurrent processes sharing the device; their results and the utilisation."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    outs = [workdir / f"job-{i}-{time.monotonic_ns()}.json" for i in range(len(jobs))]
    with UtilisationSampler() as sampler:
        started = time.perf_counter()
        processes = [context.Process(target=_child, args=(job, str(out))) for job, out in zip(jobs, outs)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        wall = time.perf_counter() - started
    results = [json.loads(out.read_text()) if out.exists() else {"error": "the process wrote no result"}
               for out in outs]
    return results, {**sampler.summary(), "wall_s": round(wall, 1)}


# --------------------------------------------------------------------------- sections


def section_device(device: str, sizes: dict[str, Any], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "device": device, "cuda": torch.version.cuda}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
    return info


def _teacher(sizes: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**sizes["teacher"], "epochs": 1, "lr": 0.05, "optimizer": "sgd", "batch_size": 128, **changes}


def _kd_config(sizes: dict[str, Any], device: str, **changes: Any) -> dict[str, Any]:
    return {**sizes["student"], "alpha": 0.1, "temperature": 4.0, "lr": 0.05, "optimizer": "sgd", "batch_size": 64,
            "epochs": sizes["epochs"] + 1, "device": device, "seed": 0, **changes}


def section_amp(device: str, sizes: dict[str, Any], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    source = {"kind": "synthetic", "images": sizes["images"]}
    data, targets, _ = teacher_targets(source, _teacher(sizes), "logits", str(workdir / "cache"), device, None)
    out = {}
    for amp in (False, True):
        out["bf16" if amp else "fp32"] = timed_run(_kd_config(sizes, device, amp=amp), data, targets)
    out["amp_speedup"] = round(out["bf16"]["samples_per_s"] / out["fp32"]["samples_per_s"], 2)
    out["loss_gap_epoch1"] = abs(out["bf16"]["train_loss_epoch1"] - out["fp32"]["train_loss_epoch1"])
    return out


def section_augment(device: str, sizes: dict[str, Any], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from kdtune.core.augment import apply_views, draw_view_params

    settings = {"crop": True, "padding": 4, "flip": True}
    x = torch.randn(sizes["images"], 3, 32, 32, generator=torch.Generator().manual_seed(1))
    params = draw_view_params(settings, len(x), 32, seed=0, index=0)
    on_cpu = apply_views(x[:512], params[:512], 4)
    on_device = apply_views(x[:512].to(device), params[:512], 4).cpu()
    xd = x.to(device)
    batch = 512

    def sweep() -> None:
        for start in range(0, len(xd), batch):
            apply_views(xd[start:start + batch], params[start:start + batch], 4)

    sweep()  # warm-up (kernels, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(3):
        sweep()
    if device == "cuda":
        torch.cuda.synchronize()
    rate = 3 * len(xd) / (time.perf_counter() - started)
    # The cached-views gather: rows k·N + i of the float16 views, to the device, as float32.
    from kdtune.core.distill import TeacherTargets

    views = np.random.default_rng(0).standard_normal((4 * len(x), 10)).astype(np.float16)
    targets = TeacherTargets(logits=views, views=4)
    index = np.arange(0, len(x), 7, dtype=np.int64) + len(x)  # view 1 of every 7th image
    gathered, _ = targets.batch(index, xd[:1], torch.device(device))
    return {"identical_to_cpu": bool(torch.equal(on_cpu, on_device)), "augment_samples_per_s": round(rate),
            "views_gather_ok": bool(torch.equal(gathered.cpu(), torch.from_numpy(views[index]).float()))}


def section_share(device: str, sizes: dict[str, Any], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    source = {"kind": "synthetic", "images": sizes["images"]}
    cache = str(workdir / "cache")
    augment = {"crop": True, "padding": 4, "flip": True}
    teacher = _teacher(sizes, augment=augment)
    for mode in ("views", "online"):  # build the caches once, before the processes read them
        teacher_targets(source, teacher, mode if mode == "views" else "logits", cache, device, augment)
    out = {}
    for mode in ("views", "online"):
        config = _kd_config(sizes, device, augment=augment, teacher_targets=mode)
        jobs = [{"name": f"{mode}-{i}", "source": source, "teacher": teacher, "mode": mode, "cache": cache,
                 "device": device, "config": {**config, "seed": i}} for i in range(sizes["share_procs"])]
        results, usage = run_wave(jobs, workdir)
        out[mode] = {"per_process_samples_per_s": [r.get("samples_per_s") for r in results],
                     "errors": [r["error"] for r in results if "error" in r], **usage}
    return out


FMNIST_TEACHER = {"family": "vgg8", "width": 0.5, "lr": 0.001, "batch_size": 128, "optimizer": "adam",
                  "lr_schedule": {"kind": "cosine", "warmup": 0, "min_factor": 0.0}}
FMNIST_AUGMENT = {"crop": True, "padding": 3, "flip": True}


def section_real_task(device: str, sizes: dict[str, Any], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    root = args.fmnist_root
    if not root or not Path(root, "train-images-idx3-ubyte.gz").exists() and not Path(root, "FashionMNIST").exists():
        return {"skipped": f"no Fashion-MNIST files under --fmnist-root {root!r}"}
    front = json.loads(Path(args.front).read_text()) if args.front and Path(args.front).exists() else default_front()
    front = front[:sizes["front_limit"]] if sizes["front_limit"] else front
    source = {"kind": "fmnist", "root": root}
    cache = str(workdir / "cache")
    teacher = {**FMNIST_TEACHER, "epochs": sizes["real_teacher_epochs"], "augment": FMNIST_AUGMENT}
    started = time.perf_counter()
    data, _, prepared = teacher_targets(source, teacher, "views", cache, device, FMNIST_AUGMENT)
    from kdtune.core.teacher import TeacherConfig, load_cached_teacher

    network = load_cached_teacher(prepared.cache_dir, 0, data, TeacherConfig(**teacher))
    teacher_test = evaluate_test(network.to(device), data, device)
    teacher_s = time.perf_counter() - started
    jobs = []
    for point in front:
        base = {"family": "resnet", "model_options": {"depth": 8}, "width": point["width"], "lr": point["lr"],
                "batch_size": point.get("batch_size", 64), "optimizer": "adam", "epochs": sizes["real_epochs"],
                "lr_schedule": {"kind": "cosine", "warmup": 0, "min_factor": 0.0}, "augment": FMNIST_AUGMENT,
                "teacher_targets": "views", "device": device, "seed": 0}
        for kind, changes in (("kd", {"alpha": point["alpha"], "temperature": point["temperature"]}),
                              ("hard", {"alpha": 1.0})):
            jobs.append({"name": f"{kind}-w{point['width']:g}", "source": source, "teacher": teacher,
                         "mode": "views", "cache": cache, "device": device, "config": {**base, **changes}})
    results, waves = [], []
    for start in range(0, len(jobs), 4):  # gpus: 0.25 -> four trials on the GPU at a time
        wave_results, usage = run_wave(jobs[start:start + 4], workdir)
        results += wave_results
        waves.append(usage)
    published = json.loads((DATA / "fashion_mnist_published.json").read_text())
    return {"teacher_test_acc": teacher_test, "teacher_s": round(teacher_s, 1), "trials": results, "waves": waves,
            "published": published}


def default_front() -> list[dict[str, Any]]:
    """The front's widths with middle-of-the-range hyperparameters, when no CPU front is given."""
    return [{"width": w, "temperature": 4.0, "alpha": 0.1, "lr": 0.003} for w in (0.25, 0.5, 1.0, 2.5)]


SECTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "device": section_device, "amp": section_amp, "augment": section_augment, "share": section_share,
    "real_task": section_real_task,
}


# --------------------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    """The results as a short Markdown page (the JSON beside it has everything)."""
    lines = ["# GPU check", "", f"Command: `{results['command']}`", ""]
    for name, section in results["sections"].items():
        lines += [f"## {name}", "", "```", json.dumps(section, indent=1, default=str)[:4000], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (what the tests run)")
    parser.add_argument("--fmnist-root", default=os.environ.get("KDTUNE_FMNIST_ROOT",
                                                                "/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--front", default=str(DATA / "real_task_front.json"))
    parser.add_argument("--only", default="", help="comma-separated sections (default: all)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if not args.smoke and device != "cuda":
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    sizes = SIZES["smoke" if args.smoke else "gpu"]
    chosen = [s for s in (args.only.split(",") if args.only else SECTIONS) if s]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        print(f"--only: unknown section {unknown[0]!r}; allowed: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"command": " ".join(["python bench/gpu_check.py", *(argv or sys.argv[1:])]),
                               "sections": {}}
    with tempfile.TemporaryDirectory(prefix="kdtune-gpu-") as tmp:
        for name in chosen:
            started = time.perf_counter()
            print(f"[gpu_check] {name} ...", flush=True)
            try:
                section = SECTIONS[name](device, sizes, Path(tmp), args)
            except Exception as exc:  # noqa: BLE001 - one broken path must not hide the others
                section = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            section["section_s"] = round(time.perf_counter() - started, 1)
            results["sections"][name] = section
            print(f"[gpu_check] {name}: {json.dumps(section, default=str)[:600]}", flush=True)
    results["imported_extras"] = imported_extras()
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(markdown(results))
    failed = [name for name, section in results["sections"].items() if "error" in section]
    print(f"-> {args.out / 'gpu_check.md'}" + (f" (failed: {', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
