"""``utilrank spectrum``'s default definitions are WeightWatcher 0.7.7's: on the built-in ViT and CNN, random
timm ViT and ResNet models and a model of size-rule edge cases, both analyze the same layers and every
shared metric agrees to round-off (the comparison itself: benchmarks/studies/weightwatcher_parity.py)."""

import importlib.util
import sys
from pathlib import Path

import pytest

# imported before the one_thread fixture limits the BLAS threads (the limit binds loaded libraries only)
pytest.importorskip("weightwatcher", reason="weightwatcher is not installed (pip install -e '.[test]'; CI does)")

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "studies" / "weightwatcher_parity.py"
_spec = importlib.util.spec_from_file_location("weightwatcher_parity", _path)
parity = importlib.util.module_from_spec(_spec)
sys.modules["weightwatcher_parity"] = parity
_spec.loader.exec_module(parity)

# weightwatcher's own divisions by zero on the all-zero layer, and its pandas deprecations: not ours to fix
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:::weightwatcher")]
EXACT = ("num_pl_spikes", "num_evals", "num_spikes", "N", "M")


@pytest.mark.parametrize("label", list(parity.parity_models()))
def test_same_layers_and_metrics_as_weightwatcher(label):
    r = parity.compare(parity.parity_models()[label]())
    assert r["analyzed_ours"] == r["analyzed_ww"], "analyzed layers differ"
    assert r["skipped_ours"] == r["skipped_ww"], "skipped layers differ"
    assert r["analyzed_ours"], "nothing analyzed"
    assert r["max_diff"]["alpha"] <= 0.01  # the bound; measured: below 1e-11
    for key, diff in r["max_diff"].items():
        assert diff <= (0 if key in EXACT else 1e-8), f"{key} differs by {diff:.3g} on {r['worst_layer'][key]}"
    assert set(r["max_diff"]) == set(parity.METRICS)
