"""The ``utilrank soup`` experiment: fine-tuned variants of one model, their soups, dense and compressed.

Dense: ``n`` ingredients fine-tuned from the trained model (seeds ``seed+1..``, learning rates cycling
through ``lrs``), compared on the test split as the best single ingredient (chosen on validation),
the uniform soup, the greedy soup (validation-driven) and cyclical SWA from the same start.

Compressed: one plan, from the base model's statistics at ``energy``; every ingredient is factored to
it on its own data subspaces (``refactor``) and fine-tuned in factored form; then the best single one,
the uniform and greedy compressed soups (dense-space average, re-factored on the soup's statistics),
and, for contrast, the naive factor-by-factor average.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..compress import CompressConfig, compress_model
from ..measure import count_params
from ..train import TrainRecipe, evaluate, train
from .average import greedy_soup, load_soup, state_dict_of, swa, uniform_soup
from .compressed import compressed_soup, greedy_compressed_soup

SOUP_FORMAT = "utilrank.soup/1"
logger = logging.getLogger(__name__)


def _row(model: nn.Module, data, device) -> dict:
    return {"val": evaluate(model, data.val, device=device),
            "test": evaluate(model, data.test, device=device)}


def _best(rows: list[dict]) -> int:
    return max(range(len(rows)), key=lambda i: rows[i]["val"])  # first of equals: the given order


def soup_experiment(
    base: nn.Module,
    data,
    *,
    arch: str,
    ingredients: Sequence | None = None,
    n: int = 5,
    epochs: int = 2,
    lrs: Sequence[float] = (3e-4, 1e-3),
    weight_decay: float = 0.01,
    seed: int = 0,
    swa_cycles: int = 5,
    compressed: bool = True,
    energy: float = 0.995,
    compressed_epochs: int = 2,
    compressed_lr: float = 1e-3,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run the experiment; returns the ``soup.json`` document (accuracies are fractions in [0, 1])."""
    log = log or logger.info
    started = time.perf_counter()
    augment = data.name == "digits"
    base = base.to(device).eval()
    if ingredients:
        models, meta = _given_ingredients(base, ingredients)
    else:
        models, meta = _trained_ingredients(base, data, n, epochs, lrs, weight_decay, seed, augment, device, log)
    for m, entry in zip(models, meta, strict=True):
        entry.update(_row(m, data, device))
    dense = _dense_soups(base, data, models, meta, device)
    if swa_cycles:
        log(f"SWA: {swa_cycles} cycles of 1 epoch from the base model, lr {max(lrs):g}")
        swa_model = swa(base, data.train, cycles=swa_cycles, lr=float(max(lrs)), weight_decay=weight_decay,
                        augment=augment, seed=seed + 100, device=device, progress=False)
        dense["swa"] = {**_row(swa_model, data, device), "cycles": swa_cycles}
    doc = {"format": SOUP_FORMAT, "model": arch, "dataset": data.name, "ingredients": meta, "dense": dense}
    if compressed:
        # one plan, from the base model at `energy`; every ingredient factored to it on its own statistics
        # (zero-padded where rank deficient: the soups need one architecture) and fine-tuned
        config = CompressConfig(method="data", energy=energy, tolerance=None, keep_ranks=True,
                                stats_batch_size=batch_size, finetune=TrainRecipe(epochs=0))
        plan = compress_model(base, data, config, arch=arch, device=device, score=False, progress=False).plan
        log(f"plan: {len(plan.layers)} layers factored at energy {energy}; each ingredient factored on its own "
            f"statistics and fine-tuned {compressed_epochs} epochs")
        recipes = [TrainRecipe(epochs=compressed_epochs, lr=compressed_lr, weight_decay=weight_decay,
                               seed=entry.get("seed", seed + 1 + i), augment=augment) for i, entry in enumerate(meta)]
        cmodels = []
        for m, entry, recipe in zip(models, meta, recipes, strict=True):
            result = compress_model(m, data, replace(config, finetune=recipe), plan=plan, arch=arch, device=device,
                                    progress=False)
            entry["projected"], entry["compressed"] = result.scores["projected"], result.scores["compressed"]
            cmodels.append(result.model)
        params = count_params(cmodels[0])
        doc["compressed"] = {"params": params, "energy": energy, "layers_factored": len(plan.layers),
                             "finetune_epochs": compressed_epochs, "param_ratio": params / dense["params"],
                             **_compressed_soups(base, data, cmodels, meta, plan, batch_size, device)}
        doc["plan"] = plan.to_dict()
    doc["rows"] = table_rows(doc)
    doc["seconds"] = time.perf_counter() - started
    return doc


def _given_ingredients(base: nn.Module, ingredients: Sequence) -> tuple[list[nn.Module], list[dict]]:
    models = [load_soup(copy.deepcopy(base), state_dict_of(src, i)).eval() for i, src in enumerate(ingredients)]
    return models, [{"name": str(src)} for src in ingredients]


def _trained_ingredients(base: nn.Module, data, n: int, epochs: int, lrs: Sequence[float], weight_decay: float,
                         seed: int, augment: bool, device, log: Callable[[str], None]) -> tuple[list[nn.Module],
                                                                                               list[dict]]:
    """``n`` fine-tuned copies of ``base``, seeds ``seed + 1 ...`` and learning rates cycling through ``lrs``."""
    models, meta = [], []
    for i in range(n):
        s, lr = seed + 1 + i, float(lrs[i % len(lrs)])
        log(f"ingredient {i + 1}/{n}: fine-tune {epochs} epochs, seed {s}, lr {lr:g}")
        m = train(copy.deepcopy(base), data.train, epochs=epochs, lr=lr, weight_decay=weight_decay,
                  seed=s, augment=augment, device=device, desc=f"ingredient {i + 1}")
        models.append(m)
        meta.append({"name": f"seed{s}-lr{lr:g}", "seed": s, "lr": lr, "epochs": epochs})
    return models, meta


def _dense_soups(base: nn.Module, data, models: list[nn.Module], meta: list[dict], device) -> dict:
    """The base model, the best single ingredient, the uniform and the greedy soup (SWA is added by the caller)."""
    def val_accuracy(m):
        return evaluate(m, data.val, device=device)

    dense: dict = {"params": count_params(base), "base": _row(base, data, device)}
    b = _best(meta)
    dense["best_single"] = {"index": b, "name": meta[b]["name"], "val": meta[b]["val"],
                            "test": meta[b]["test"]}
    soup = load_soup(copy.deepcopy(base), uniform_soup(models))
    dense["uniform"] = {**_row(soup, data, device), "size": len(models)}
    greedy_model = copy.deepcopy(base)
    g = greedy_soup(models, val_accuracy, model=greedy_model, scores=[e["val"] for e in meta], progress=False)
    dense["greedy"] = {**_row(greedy_model, data, device), "selected": [meta[i]["name"] for i in g.selected],
                       "history": [{**h, "name": meta[h["index"]]["name"]} for h in g.history]}
    return dense


def _compressed_soups(base: nn.Module, data, cmodels: list[nn.Module], meta: list[dict], plan, batch_size: int,
                      device) -> dict:
    """The compressed ingredients' best single, uniform and greedy soups (averaged dense, re-factored on the
    soup's statistics) and the naive factor-wise average, by name."""
    def val_accuracy(m):
        return evaluate(m, data.val, device=device)

    stats_loader = DataLoader(data.train, batch_size=batch_size, shuffle=False)
    crows = [e["compressed"] for e in meta]
    b = _best(crows)
    comp: dict = {"best_single": {"index": b, "name": meta[b]["name"], **crows[b]}}
    u = compressed_soup(cmodels, plan, base, batches=stats_loader)
    comp["uniform"] = {**_row(u.model, data, device), "size": len(cmodels)}
    gs = greedy_compressed_soup(cmodels, plan, base, val_accuracy, batches=stats_loader,
                                scores=[r["val"] for r in crows], progress=False)
    comp["greedy"] = {**_row(gs.model, data, device), "selected": [meta[i]["name"] for i in gs.selected],
                      "history": [{**h, "name": meta[h["index"]]["name"]} for h in gs.greedy.history]}
    naive = load_soup(copy.deepcopy(cmodels[0]), uniform_soup(cmodels))
    comp["factorwise"] = _row(naive, data, device)
    return comp


def table_rows(doc: dict) -> list[dict]:
    """The comparison as flat rows: method, then dense and compressed val/test (None where n/a)."""
    d, c = doc["dense"], doc.get("compressed")
    n = len(doc["ingredients"])

    def pair(entry):
        return (entry["val"], entry["test"]) if entry else (None, None)

    specs = [
        ("base model (not fine-tuned)", d["base"], None),
        (f"best single of {n} (by val)", d["best_single"], c and c["best_single"]),
        (f"uniform soup ({n})", d["uniform"], c and c["uniform"]),
        (f"greedy soup ({len(d['greedy']['selected'])}"
         + (f" / {len(c['greedy']['selected'])}" if c else "") + f" of {n})", d["greedy"], c and c["greedy"]),
    ]
    if "swa" in d:
        specs.append((f"SWA ({d['swa']['cycles']} cycles)", d["swa"], None))
    if c:
        specs.append(("factor-wise average (naive)", None, c["factorwise"]))
    rows = []
    for name, de, ce in specs:
        (dv, dt), (cv, ct) = pair(de), pair(ce)
        rows.append({"method": name, "dense_val": dv, "dense_test": dt,
                     "compressed_val": cv, "compressed_test": ct})
    return rows


def format_soup_table(doc: dict) -> str:
    c = doc.get("compressed")
    def pct(v):
        return f"{v:>8.2%}" if v is not None else f"{'-':>8}"

    head = f"{'':<34}{'dense':>17}"
    if c:
        head += f"{'compressed':>19}"
    sub = f"{'':<34}{'val':>8} {'test':>8}" + (f"  {'val':>8} {'test':>8}" if c else "")
    lines = [f"ingredients ({doc['model']} on {doc['dataset']}):"]
    for e in doc["ingredients"]:
        line = f"  {e['name']:<32}{pct(e['val'])} {pct(e['test'])}"
        if c:
            line += f"  {pct(e['compressed']['val'])} {pct(e['compressed']['test'])}"
            line += f"   (factored before fine-tuning: test {e['projected']['test']:.2%})"
        lines.append(line)
    lines += ["", head, sub, "-" * len(sub)]
    for r in doc["rows"]:
        line = f"{r['method']:<34}{pct(r['dense_val'])} {pct(r['dense_test'])}"
        if c:
            line += f"  {pct(r['compressed_val'])} {pct(r['compressed_test'])}"
        lines.append(line)
    d = doc["dense"]
    lines.append(f"dense greedy soup: {', '.join(d['greedy']['selected'])}")
    if c:
        lines.append(f"compressed greedy soup: {', '.join(c['greedy']['selected'])}")
        lines.append(f"compressed: {c['layers_factored']} layers factored at energy {c['energy']}, "
                     f"{c['params']:,} parameters ({c['param_ratio']:.1%} of {d['params']:,}); "
                     "soups averaged "
                     "as dense B @ A and re-factored on the soup's own statistics")
    return "\n".join(lines)
