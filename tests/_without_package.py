"""Run exported files in a fresh Python process that cannot import ``utilrank_kernels``: what a user who
deploys the file without this package gets."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

# the child refuses the package at import time and reports every module it loaded
_CHILD = r"""
import importlib.abc, json, sys

class RefusePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "utilrank_kernels":
            raise ImportError("this process runs exported files without utilrank_kernels")

sys.meta_path.insert(0, RefusePackage())
import numpy as np

job = json.loads(sys.argv[1])
if job["onnx"]:
    import onnxruntime as ort

    session = ort.InferenceSession(job["onnx"], providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for src, dst in zip(job["inputs"], job["onnx_outputs"]):
        np.save(dst, session.run(None, {name: np.load(src)})[0])
if job["program"]:
    import torch

    module = torch.export.load(job["program"]).module()
    with torch.inference_mode():
        for src, dst in zip(job["inputs"], job["program_outputs"]):
            np.save(dst, module(torch.from_numpy(np.load(src))).numpy())
print(json.dumps({"package_modules": [m for m in sys.modules if m.split(".")[0] == "utilrank_kernels"]}))
"""


def run_without_package(inputs: list[torch.Tensor], work: Path, onnx: Path | None = None,
                        program: Path | None = None) -> dict[str, list[torch.Tensor]]:
    """The outputs of the ONNX file (onnxruntime's CPU provider) and/or the ExportedProgram
    (``torch.export.load``) on each input, computed in a child process that never has ``utilrank_kernels`` in
    ``sys.modules`` (asserted)."""
    job = {"onnx": str(onnx) if onnx else None, "program": str(program) if program else None, "inputs": [],
           "onnx_outputs": [], "program_outputs": []}
    for i, x in enumerate(inputs):
        job["inputs"].append(str(work / f"in{i}.npy"))
        np.save(job["inputs"][-1], x.numpy())
        job["onnx_outputs"].append(str(work / f"onnx{i}.npy"))
        job["program_outputs"].append(str(work / f"program{i}.npy"))
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(job)], cwd=work, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["package_modules"] == [], report
    out = {}
    for key, path in (("onnx", onnx), ("program", program)):
        if path:
            out[key] = [torch.from_numpy(np.load(p)) for p in job[f"{key}_outputs"]]
    return out
