"""Whole jobs, as the CLI, the notebooks and the scripts run them: quantize a model and write its run
folder, or measure a model's perplexity. Every check that can fail runs before the long work
(:mod:`magr.pipeline.preflight`); every file is written atomically (:mod:`magr.pipeline.persistence`).
"""
from __future__ import annotations

import logging
from concurrent.futures import as_completed
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .pipeline import preflight
from .pipeline.calibration_data import Calibration
from .pipeline.checkpoints import RESUME_POLICIES, remove_checkpoints
from .evaluation.perplexity import Evaluation
from .deploy.export import Export, check_exportable, check_output_folder, export_model, export_streamed
from .core.methods import QuantConfig
from .pipeline.families import window_protocol
from .pipeline.models import DTYPES, linear_shapes, load_model, model_source, resolve_device
from .pipeline.persistence import CHECKPOINT_FOLDER, retire_run, run_lock, save_quantized, write_run
from .pipeline.blocks import Interrupted, quantize_model
from .pipeline.streaming import StreamedModel, open_model, save_streamed, will_stream
from .pipeline.workers import check_workers, worker_pool
from .core.settings import check_choice
from .pipeline.machine import NATIVE_HALF, native_half
from .pipeline.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def _check_dtype(dtype: str, name: str = "dtype") -> None:
    if dtype not in DTYPES:
        raise ValueError(f"{name}={dtype!r} not supported; allowed: {', '.join(DTYPES)}")


def forward_dtype_of(dtype: str, forward_dtype: str | None, device) -> str:
    """The dtype of a run's forwards (``forward_dtype``, default the model's ``dtype``), checked; warns on a CPU
    that has no native half-precision matmuls (oneDNN then emulates them: slower, same numbers)."""
    _check_dtype(dtype)
    forward = forward_dtype or dtype
    _check_dtype(forward, "forward_dtype")
    if torch.device(device).type == "cpu" and native_half(DTYPES[forward]) is False:
        log.warning("forward_dtype=%s: this CPU has none of %s, so %s matmuls are emulated and the forwards run "
                    "slower than in float32 (benchmarks/NOTES.md); the numbers are the same", forward,
                    "/".join(NATIVE_HALF[DTYPES[forward]]), forward)
    return forward


def quantize_run(model: str, out, quant: QuantConfig, calibration: Calibration = Calibration(),
                 evaluation: Evaluation = Evaluation(), dtype: str = "float32", device: str | None = None,
                 data_root=None, save: bool = True, checkpoint_dir=None, progress: bool = True,
                 resume: str = "auto", keep_checkpoints: bool = False, export: Export | None = None,
                 forward_dtype: str | None = None, streams: dict | None = None, load: str = "auto") -> dict:
    """Quantize ``model`` (alias, folder, .gguf or hub id) with ``quant``, evaluate it, write the run folder.

    ``out`` receives ``magr_run.json`` and ``magr_layers.json`` (and, with ``save``, the model and its
    grids). Block checkpoints go to ``checkpoint_dir`` (default ``out/.blocks`` when saving); a rerun
    resumes them per ``resume`` (auto, never, force: :mod:`magr.pipeline.checkpoints`), and they are removed once the
    run is written unless ``keep_checkpoints``. With ``export``, the packed checkpoint also goes to
    ``out/<format>`` (:func:`magr.deploy.export.export_model`). ``forward_dtype`` (default ``dtype``): the dtype
    of the model's forwards, calibration propagation and evaluation (the math stays float32). ``streams``: the
    evaluation sets' tokens, when the caller has them already (:func:`quantize_cell`). ``load``: ``auto`` streams
    a safetensors folder one block at a time from disk to disk (:mod:`magr.pipeline.streaming`; its block
    checkpoints are then always written, and removed at the end unless kept, also without ``save``), ``stream``
    insists on it, ``full`` loads the whole model. Returns the run metadata.
    """
    dev = resolve_device(device)
    forward = forward_dtype_of(dtype, forward_dtype, dev)
    calibration.check(data_root)
    evaluation.check(data_root)
    streamed = will_stream(model, load)
    protocol = window_protocol(model)  # the model family's windows, unless the settings fix them
    calibration, evaluation = calibration.for_protocol(protocol), evaluation.for_protocol(protocol)
    out = Path(out)
    ckpt = preflight.default_checkpoint_dir(out, save or streamed, checkpoint_dir)
    preflight.check_output(out, model, ckpt, save)
    check_choice("resume", resume, RESUME_POLICIES)
    with run_lock(out):  # a second run into `out` refuses from here until this one ends
        return _quantize_locked(model, out, quant, calibration, evaluation, dtype, dev, forward, data_root, save, ckpt,
                                progress, resume, keep_checkpoints, export, streams, "stream" if streamed else "full")


def _quantize_locked(model, out: Path, quant, calibration, evaluation, dtype, dev, forward, data_root, save, ckpt,
                     progress, resume, keep_checkpoints, export, streams, load) -> dict:
    """:func:`quantize_run` once ``out`` is checked and locked: the remaining checks, then the work."""
    if export is not None:
        if not save:
            raise ValueError(f"save_format={export.format!r} needs the model saved; drop --no-save")
        check_output_folder(out / export.format)

    def check(net):  # architecture, layer widths, context, disk space, the export format's limits
        preflight.check_model(net, quant, calibration, evaluation)
        preflight.check_disk_space(net, quant.grid.group_size, out, save, ckpt, linked=load == "stream")
        if export is not None:
            check_exportable(quant.grid, export, linear_shapes(net), net)

    preflight.check_weight_files(model)  # a truncated or damaged model.safetensors (or shard)
    skeleton = preflight.model_skeleton(model, DTYPES[dtype])  # config only: no weights read yet
    if skeleton is not None:
        check(skeleton)
    tokenizer = load_tokenizer(model)
    if streams is None:
        streams = evaluation.streams(tokenizer, data_root)
    calib = calibration.tokens(tokenizer, data_root)
    net, tokenizer, blocks = open_model(model, DTYPES[dtype], tokenizer, load)
    if skeleton is None:  # a .gguf: its config came with the weights
        check(net)
    preflight.check_finite(net, blocks)  # a streamed model: one pass over its blocks
    result = quantize_model(net, calib, quant, device=dev, progress=progress, checkpoint_dir=ckpt, resume=resume,
                            forward_dtype=DTYPES[forward], blocks=blocks)
    quantized = result.quantized  # streamed: the blocks are read back from their checkpoints; else None
    try:
        retire_run(out)
        if save and quantized is not None:
            save_streamed(quantized, tokenizer, result.params, out, [result.checkpoints.shard(i) for i in range(len(quantized))])
        elif save:
            save_quantized(net, tokenizer, result.params, out)
        meta = {"model": str(model), "dtype": dtype, "forward_dtype": forward, "device": str(dev), "load": load,
                "config": quant.to_dict(), "window_protocol": _windows(model, calibration, evaluation),
                "calibration": asdict(calibration), "seconds": result.seconds,
                "block_seconds": result.block_seconds, "saved": save, "resumed_blocks": result.resumed}
        if evaluation.eval_sets:
            meta["ppl"] = evaluation.perplexities(net, tokenizer, dev, data_root, streams=streams,
                                                  forward_dtype=DTYPES[forward], blocks=quantized)
        write_run(out, meta, result.records)
        if export is not None:
            _export(net, tokenizer, result.params, quant.grid, out, export, quantized, dtype)
    except KeyboardInterrupt:
        kept = f"every block is saved in {ckpt}; rerun the same command to finish" if ckpt else "nothing saved"
        raise Interrupted(f"interrupted after quantizing, before {out} was written: {kept}") from None
    if result.checkpoints is not None and not keep_checkpoints:
        result.checkpoints.remove()
    return meta


def _windows(model, calibration: Calibration, evaluation: Evaluation) -> dict:
    """What a run's windows start with: its model family's protocol and the settings used (run metadata)."""
    return {**window_protocol(model).to_dict(), "calib_bos": calibration.calib_bos,
            "eval_bos": evaluation.bos_per_window}


def _export(net, tokenizer, params, grid, out: Path, export: Export, quantized, dtype: str) -> None:
    """The packed checkpoint in ``out/<format>``: block by block for a streamed model (GGUF, one file, reads the
    saved run folder whole), else from the model in memory."""
    if quantized is not None and export.format == "gguf":
        net, tokenizer = load_model(str(out), dtype=DTYPES[dtype], tokenizer=tokenizer)
    elif quantized is not None:
        export_streamed(quantized, tokenizer, params, grid, out / export.format, export, source=str(out))
        return
    export_model(net, tokenizer, params, grid, out / export.format, export, source=str(out))


def _check_workers(workers, model, load: str, device, why: str) -> int:
    """``workers`` checked (:func:`magr.pipeline.workers.check_workers`); more than one also needs a streamed model:
    each process then holds only the model's resident part and one block."""
    if check_workers(workers, resolve_device(device)) > 1 and not will_stream(model, load):
        raise ValueError(f"workers={workers} {why}, which needs a streamed model: a folder of safetensors files "
                         f"(load auto or stream), not {str(model)!r} with load={load}; prepare one (python "
                         "scripts/prepare_model.py --source MODEL --out FOLDER) or use workers=1")
    return workers


def seed_folder(out, seed: int) -> Path:
    """The run folder of one calibration seed of a cell: OUT/seed-<seed>."""
    return Path(out) / f"seed-{seed}"


def quantize_cell(model: str, out, quant: QuantConfig, seeds, calibration: Calibration = Calibration(),
                  evaluation: Evaluation = Evaluation(), save: bool = False, export: Export | None = None,
                  workers: int = 1, **options) -> list[dict]:
    """One cell of the pipeline: :func:`quantize_run` once per calibration seed, into OUT/seed-<seed>.

    A method that reads no calibration data (RTN) gives the same model for every seed, so it runs once,
    for the first seed. ``save`` keeps the model of the first seed only (the one the zero-shot stages
    evaluate), and ``export`` packs that model. ``options`` go to :func:`quantize_run`. The evaluation sets are read and
    tokenized once for all seeds. ``workers`` > 1: the seeds and their evaluation sets run in that many one-thread
    processes (:func:`_cell_in_workers`). Returns the run metadata of each seed.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds} must be a non-empty list of distinct integers")
    _check_workers(workers, model, options.get("load", "auto"), options.get("device"),
                   "evaluates each seed's model from its block checkpoints")
    if not quant.uses_calibration:
        if len(seeds) > 1:
            log.info("%s reads no calibration data: one run (seed %d) stands for every seed", quant.label, seeds[0])
        seeds = seeds[:1]
    if workers > 1 and evaluation.eval_sets:  # the sequential runs check it in quantize_run; the workers' do not see the sets
        preflight.check_eval_context(model, evaluation.eval_seqlen)
    if (len(seeds) > 1 or workers > 1) and evaluation.eval_sets and options.get("streams") is None:
        evaluation.check(options.get("data_root"))
        options["streams"] = evaluation.streams(load_tokenizer(model), options.get("data_root"))
    if workers > 1:
        return _cell_in_workers(model, out, quant, seeds, calibration, evaluation, save, export, workers, options)
    return [quantize_run(model, seed_folder(out, s), quant, replace(calibration, seed=s), evaluation,
                         save=save and i == 0, export=export if i == 0 else None, **options)
            for i, s in enumerate(seeds)]


def _cell_in_workers(model, out, quant, seeds, calibration, evaluation, save, export, workers, options) -> list[dict]:
    """:func:`quantize_cell` in ``workers`` one-thread processes (:mod:`magr.pipeline.workers`): each seed's
    quantization is a task (:func:`quantize_run` without its evaluation, its block checkpoints kept), and as one
    ends, each of its evaluation sets is a task over those checkpoints (:func:`evaluate_checkpoints`); then the
    seed's ``magr_run.json`` gets its perplexities and the checkpoints go. The numbers are those of the same cell
    run in one process at one thread, whatever the schedule."""
    streams, keep = options.pop("streams", None), options.pop("keep_checkpoints", False)
    options.pop("progress", None)  # the tasks show none; the bar below counts them
    evaluation = evaluation.for_protocol(window_protocol(model))
    folders = {s: seed_folder(out, s) for s in seeds}
    try:
        runs, ppl = _run_cell_tasks(model, quant, seeds, calibration, evaluation, save, export, workers, options,
                                    streams, folders)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: the finished blocks of every seed are in {Path(out)}/seed-*/"
                          f"{CHECKPOINT_FOLDER}; rerun the same command to resume") from None
    for s in seeds:
        if evaluation.eval_sets:
            runs[s]["ppl"] = {name: ppl[s, name] for name in evaluation.eval_sets}
            write_run(folders[s], runs[s])
        if not keep:
            remove_checkpoints(folders[s] / CHECKPOINT_FOLDER)
    return [runs[s] for s in seeds]


def _run_cell_tasks(model, quant, seeds, calibration, evaluation, save, export, workers, options, streams,
                    folders) -> tuple[dict, dict]:
    """The tasks of :func:`_cell_in_workers`: (seed -> run metadata, (seed, set) -> perplexity entry)."""
    runs, ppl = {}, {}
    tasks = len(seeds) * (1 + len(evaluation.eval_sets))
    with worker_pool(workers) as pool, tqdm(total=tasks, desc=f"{quant.label}: seeds, then their sets "
                                                              f"({workers} workers)", unit="task") as bar:
        quantizing = {pool.submit(quantize_run, model, folders[s], quant, replace(calibration, seed=s),
                                  replace(evaluation, eval_sets=()), save=save and i == 0,
                                  export=export if i == 0 else None, keep_checkpoints=True, progress=False,
                                  **options): s for i, s in enumerate(seeds)}
        evaluating = {}
        for done in as_completed(quantizing):
            s = quantizing[done]
            runs[s] = done.result()
            bar.update()
            for name in evaluation.eval_sets:
                evaluating[pool.submit(evaluate_checkpoints, model, folders[s] / CHECKPOINT_FOLDER,
                                       replace(evaluation, eval_sets=(name,)), {name: streams[name]},
                                       dtype=runs[s]["dtype"], forward_dtype=runs[s]["forward_dtype"],
                                       data_root=options.get("data_root"))] = (s, name)
        for done in as_completed(evaluating):
            ppl[evaluating[done]] = done.result()[evaluating[done][1]]
            bar.update()
    return runs, ppl


def evaluate_checkpoints(model, checkpoints, evaluation: Evaluation, streams: dict | None = None,
                         dtype: str = "float32", forward_dtype: str | None = None, data_root=None) -> dict:
    """Perplexities of a streamed :func:`quantize_run`'s model on the CPU from its kept block checkpoints: the
    resident tensors (embeddings, final norm, lm_head) of the folder ``model`` and the quantized blocks in
    ``checkpoints``; the same forwards, in ``forward_dtype``, as the run's own evaluation."""
    source = StreamedModel.from_folder(model_source(model)[1], DTYPES[dtype])
    return evaluation.perplexities(source.model, load_tokenizer(model), "cpu", data_root, streams=streams,
                                   forward_dtype=DTYPES[forward_dtype or dtype], blocks=source.with_checkpoints(checkpoints))


def perplexity_run(model: str, evaluation: Evaluation, dtype: str = "float32", device: str | None = None,
                   data_root=None, forward_dtype: str | None = None, load: str = "auto", workers: int = 1) -> dict:
    """Perplexity of ``model`` on every set of ``evaluation``: {"model", "dtype", "forward_dtype", "ppl": {set:
    {...}}}, the forwards in ``forward_dtype`` (default ``dtype``); ``load`` as in :func:`quantize_run` (a
    streamed model goes through its blocks one at a time: :func:`magr.evaluation.perplexity.streamed_nll`).
    ``workers`` > 1: one set per task in that many one-thread processes (:mod:`magr.pipeline.workers`)."""
    dev = resolve_device(device)
    if not evaluation.eval_sets:
        raise ValueError("no perplexity sets given; name them with eval_sets (CLI: --eval-sets wikitext2 c4)")
    evaluation.check(data_root)
    if _check_workers(workers, model, load, dev, "loads the model once per process") > 1:
        sets = evaluation.eval_sets
        with worker_pool(min(workers, len(sets))) as pool:
            parts = [pool.submit(perplexity_run, model, replace(evaluation, eval_sets=(name,)), dtype, device,
                                 data_root, forward_dtype, load) for name in sets]
            parts = [part.result() for part in parts]
        return {**parts[0], "ppl": {name: part["ppl"][name] for name, part in zip(sets, parts)}}
    forward = forward_dtype_of(dtype, forward_dtype, dev)
    evaluation = evaluation.for_model(model)  # the model family's windows, unless set
    preflight.check_weight_files(model)
    skeleton = preflight.model_skeleton(model, DTYPES[dtype])
    if skeleton is not None:
        preflight.check_context(skeleton, evaluation.eval_seqlen, "eval_seqlen")
    will_stream(model, load)  # a source that cannot stream under --load stream: refused before any work
    tokenizer = load_tokenizer(model)
    streams = evaluation.streams(tokenizer, data_root)
    net, tokenizer, blocks = open_model(model, DTYPES[dtype], tokenizer, load)
    ppl = evaluation.perplexities(net, tokenizer, dev, data_root, streams=streams, forward_dtype=DTYPES[forward],
                                  blocks=blocks)
    protocol = {**window_protocol(model).to_dict(), "eval_bos": evaluation.bos_per_window}
    return {"model": str(model), "dtype": dtype, "forward_dtype": forward, "load": load, "window_protocol": protocol,
            "ppl": ppl}
