"""Export the student: a plain Hugging Face model directory plus fusion metadata.

Contract: everything is written into a temporary directory beside `out`, which is
then renamed to `out` (an existing export at `out` is replaced only after the new one
is complete). Any failure on the way (out of disk, permissions, a bug) removes the
temporary directory and raises DistillError: there is never a half-written export.
The directory loads with `AutoModelForCausalLM.from_pretrained`, plain vLLM, and
`fusion serve` (as a one-member ensemble); `fusion_distill.json` records how it was
made.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

from .data import DistillError

METADATA = "fusion_distill.json"


def export_student(model, tokenizer, out: pathlib.Path, metadata: dict) -> pathlib.Path:
    out = pathlib.Path(out).resolve()
    if out.exists() and not (
        out.is_dir() and (not any(out.iterdir()) or (out / METADATA).exists())
    ):
        raise DistillError(f"--out: {out} exists and is not an earlier distill export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / METADATA).write_text(json.dumps(metadata, indent=1, sort_keys=True) + "\n")
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise DistillError(f"export to {out} failed ({err}); nothing was written") from err
        raise
    return out
