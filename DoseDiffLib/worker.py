"""The prediction child process the Slicer module starts: `python -m DoseDiffLib.worker JOB.json`.

It runs the same library calls as `dosediff predict --ct ... --structures ...` (registry,
load_model, prepare_case, predict_case, write_volume), so Slicer and the command line
cannot drift apart. Slicer stays responsive because all of it, model loading included,
happens here. Progress, the result and a failure are reported as one JSON object per
stdout line after the prefix `DOSEDIFF `; anything else on stdout is ignored by the reader.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

PREFIX = "DOSEDIFF "


def emit(event: str, **payload: Any) -> None:
    """One protocol line; flushed so the parent sees it at once."""
    sys.stdout.write(PREFIX + json.dumps({"event": event, **payload}) + "\n")
    sys.stdout.flush()


def read_on_own_grid(path: str | Path):
    """An image as written, without read_volume's reorientation: the dose must come back on the CT node's grid.

    prepare_case takes any orientation and predict_case returns the dose on the CT's own grid,
    so the Slicer volume's voxels and the dose's voxels coincide one to one.
    """
    import SimpleITK as sitk

    from .volume import Volume

    return Volume.from_sitk(sitk.ReadImage(str(path)))


def read_masks(folder: str | Path) -> dict[str, Any]:
    """The segment masks the module wrote (names.json + one NRRD each), each on the CT's own grid."""
    folder = Path(folder)
    names = json.loads((folder / "names.json").read_text(encoding="utf-8"))
    out = {}
    for i, name in enumerate(names):
        vol = read_on_own_grid(folder / f"mask_{i:03d}.nrrd")
        out[name] = vol.with_array((vol.array != 0).astype("uint8"))
    return out


def run(job: dict[str, Any]) -> None:
    """Predict the dose the job file describes and write it where the job says."""
    emit("progress", done=0, total=0, message="Loading the model")
    from .modelcard import load_model
    from .predict import body_from_ct, predict_case, prepare_case
    from .registry import resolve
    from .rois import BODY
    from .runtime import choose_device
    from .volume import write_volume

    device = choose_device(job.get("device", "auto"))
    model, cfg, card = load_model(resolve(job["model"]), device)
    emit("progress", done=0, total=0, message="Preparing the CT and structures")
    ct = read_on_own_grid(job["ct"])
    masks = read_masks(job["structures"])
    inputs = prepare_case(ct, masks, cfg, job.get("mapping") or None)
    # sampler/steps/samples left out (None) mean the model card's validated sampler, as on the command line
    sampler = {k: int(job[k]) for k in ("steps", "samples") if job.get(k)}
    if job.get("sampler"):
        sampler["sampler"] = str(job["sampler"])

    def progress(done: int, total: int, message: str) -> None:
        emit("progress", done=done, total=total, message=message)

    pred = predict_case(inputs, model, cfg, **sampler, seed=job.get("seed"), device=device,
                        with_std=bool(job.get("with_std")), progress=progress)
    dose, std = pred.dose, pred.std
    if inputs.output_grid is not None:
        # predict_case masks the body on the axial grid and then resamples; on an oblique CT that
        # interpolation reaches past the body, so the body is applied again on the CT's own grid.
        body_name = inputs.matched.get(BODY)
        body = masks[body_name].array if body_name else body_from_ct(ct)
        dose = dose.with_array(dose.array * (body > 0))
        std = std.with_array(std.array * (body > 0)) if std is not None else None
    write_volume(dose, job["dose"], overwrite=True)
    std_path = str(write_volume(std, job["std"], overwrite=True)) if std is not None else None
    info = dict(pred.info, model=card["name"], model_sha256=card["weights"]["sha256"])
    emit("result", dose=job["dose"], std=std_path, info=info)


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .errors import DoseDiffError

    try:
        run(json.loads(Path(argv[0]).read_text(encoding="utf-8")))
        return 0
    except DoseDiffError as exc:
        emit("error", problem=exc.problem, fix=exc.fix)
        return 2
    except Exception as exc:  # reported to the panel; the traceback goes to stderr for the log
        traceback.print_exc()
        if _is_out_of_memory(exc):
            emit("error", problem="The prediction ran out of memory.",
                 fix="Choose the CPU device, close other programs, or use fewer samples.")
            return 3
        emit("error", problem=f"The prediction failed: {type(exc).__name__}: {exc}", fix="See the Python log.")
        return 1


if __name__ == "__main__":
    sys.exit(main())
