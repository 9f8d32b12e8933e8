"""The prediction child process the Slicer module starts: `python -m DoseDiffLib.worker JOB.json`.

It runs the one prediction path, `job.run_prediction`, as `dosediff predict` does, so
Slicer and the command line cannot drift apart. Slicer stays responsive because all of
it, model loading included, happens here. Progress, the result and a failure are reported as one JSON object per
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

    The prediction takes any orientation and returns the dose on the CT's own grid, so the
    Slicer volume's voxels and the dose's voxels coincide one to one.
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
    from .job import Case, Outputs, Sampling, run_prediction
    from .modelcard import load_model
    from .registry import resolve
    from .runtime import choose_device

    device = choose_device(job.get("device", "auto"))
    loaded = load_model(resolve(job["model"]), device)
    emit("progress", done=0, total=0, message="Preparing the CT and structures")
    case = Case(read_on_own_grid(job["ct"]), read_masks(job["structures"]), str(job["ct"]))
    # sampler/steps/samples left out (None) mean the model card's validated sampler, as on the command line
    sampling = Sampling(str(job["sampler"]) if job.get("sampler") else None, int(job["steps"]) if job.get("steps") else None,
                        int(job["samples"]) if job.get("samples") else None, seed=job.get("seed"), device=device)
    outputs = Outputs((Path(job["dose"]),), Path(job["std"]) if job.get("with_std") else None, overwrite=True)

    def progress(done: int, total: int, message: str) -> None:
        emit("progress", done=done, total=total, message=message)

    pred, written = run_prediction(case, loaded, outputs, sampling, job.get("mapping") or None, progress)
    std_path = str(written["std"]) if "std" in written else None
    info = dict(pred.info, model=loaded[2]["name"], model_sha256=loaded[2]["weights"]["sha256"])
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
