"""The rank search under an accuracy tolerance (DESIGN §1 step 7) and its total budget."""

import pytest
import torch
from _cases import Case, rel_err

from utilrank_kernels import factor_model, plan_ranks


@pytest.mark.parametrize("method, budget", [("data", 3.0), ("optimal", 5.0)])
def test_search_backs_off_until_the_cuts_together_fit(method, budget):
    """Each cut alone within the tolerance can still cost much together: with a total budget, every layer
    backs off until all cuts at once fit it (here "accuracy" is 1 - the relative output error)."""
    case = Case("vit", batch_size=8)
    report, model, x = case.report(0.99), case.model, case.batches[0]
    with torch.no_grad():
        reference = model(x)
        score = lambda m: 1.0 - rel_err(m(x), reference)  # noqa: E731
        search = {"method": method, "tolerance": 5.0, "evaluate": score, "progress": False}
        per_layer = plan_ranks(model, report, case.subspaces, total_tolerance=1e9, **search)
        fitted = plan_ranks(model, report, case.subspaces, total_tolerance=budget, **search)
        assert per_layer.layers.keys() == fitted.layers.keys() and len(fitted.layers) > 2
        loose = score(factor_model(model, per_layer, case.subspaces)[0])
        together = score(factor_model(model, fitted, case.subspaces)[0])
    assert 100 * (1.0 - loose) > budget  # the per-layer cuts together exceed the budget ...
    assert 100 * (1.0 - together) <= budget  # ... and the backed-off ones fit it
    assert all(fitted.layers[n].energy > per_layer.layers[n].energy and "backed off" in fitted.layers[n].reason
               for n in fitted.layers)
    assert fitted.method == method and fitted.meta["total_tolerance"] == budget


def test_search_needs_an_evaluation():
    case = Case("linear", batches=1)
    with pytest.raises(ValueError, match="evaluate"):
        plan_ranks(case.model, case.report(0.99), case.subspaces, tolerance=1.0, progress=False)
