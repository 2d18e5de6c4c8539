"""The measured backend choice (ops/_tune.py), driven on the CPU with injected timings: a GPU is faked by the
predicates the dispatch rule reads (as in test_dispatch.py), the candidates' kernels by a fake ``run_linear`` /
``run_mlp`` that computes the torch reference and notes which candidate ran, and the timer by a table of
microseconds. And the torch path's cuBLASLt epilogue (``torch._addmm_activation``) against fp64."""

from __future__ import annotations

import json
import logging
import multiprocessing
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import utilrank_kernels.ops.lowrank as lowrank_ops
from utilrank_kernels.cli import main
from utilrank_kernels.nn import LowRankLinear, LowRankMlp, layer_backends, tune
from utilrank_kernels.ops import _dispatch, _tune, lowrank_linear
from utilrank_kernels.ops._tune import Candidate, Tuner, TuneWarning


class FakeTimer:
    """Seconds per call from a table of microseconds; remembers what it was asked to time."""

    def __init__(self, us: dict[str, float]):
        self.us, self.calls = us, []

    def __call__(self, fns: dict) -> dict[str, float]:
        self.calls.append(sorted(fns))
        for fn in fns.values():
            fn()
        return {name: self.us[name] * 1e-6 for name in fns}


def never_timed(fns):
    raise AssertionError(f"timed {sorted(fns)}")


KEY = ("lowrank_linear", torch.device("cuda:0"), torch.bfloat16, 256, (768, 3072, 192), "gelu", 1)


def candidates(ran: list, fail: str | None = None, ineligible: dict | None = None) -> list[Candidate]:
    def run(name):
        def call():
            ran.append(name)
            if name == fail:
                raise RuntimeError(f"{name} exploded\nsecond line")
        return call

    ineligible = ineligible or {}
    return [Candidate(n, None, ineligible[n]) if n in ineligible else Candidate(n, run(n))
            for n in ("torch", "triton:fused", "triton:split", "cuda")]


@pytest.fixture
def fake_names(monkeypatch):
    """A named GPU and fixed versions for keys (``cuda:0`` is not looked up: there is none here)."""
    names = {"device": "NVIDIA H200", "versions": "torch=2.11 triton=3.6 ext=none utilrank=0"}
    monkeypatch.setattr(_tune, "device_name", lambda device: names["device"])
    monkeypatch.setattr(_tune, "versions", lambda: names["versions"])
    monkeypatch.delenv("UTILRANK_TUNE", raising=False)
    return names


# ------------------------------------------------------------------------------------------------
# The chooser
# ------------------------------------------------------------------------------------------------
def test_takes_the_fastest_and_records_it(tmp_path, fake_names):
    timer = FakeTimer({"torch": 30.0, "triton:fused": 21.5, "triton:split": 40.0, "cuda": 25.0})
    tuner, ran = Tuner(tmp_path, timer), []
    assert tuner.choose(KEY, candidates(ran), fallback="triton") == "triton:fused"
    assert timer.calls == [["cuda", "torch", "triton:fused", "triton:split"]]
    data = json.loads(tuner.path("cuda:0").read_text())
    assert tuner.path("cuda:0").name == "nvidia-h200.json" and data["format"] == _tune.TUNE_FORMAT
    (key, entry), = data["entries"].items()
    assert "NVIDIA H200" in key and "rows<=256" in key and "768x3072x192" in key and "triton=3.6" in key
    assert entry["choice"] == "triton:fused" and entry["us"]["torch"] == 30.0 and entry["passed_over"] == {}
    ran.clear()
    assert tuner.choose(KEY, candidates(ran), fallback="triton") == "triton:fused"  # recorded: nothing runs
    assert ran == [] and len(timer.calls) == 1


def test_ties_keep_the_first_candidate(tmp_path, fake_names):
    tuner = Tuner(tmp_path, FakeTimer(dict.fromkeys(("torch", "triton:fused", "triton:split", "cuda"), 7.0)))
    assert tuner.choose(KEY, candidates([]), fallback="triton") == "torch"


def test_passes_over_failing_and_ineligible_candidates_with_one_line_reasons(tmp_path, fake_names, caplog):
    timer = FakeTimer({"torch": 30.0, "triton:fused": 1.0, "triton:split": 40.0})
    tuner = Tuner(tmp_path, timer)
    reason = "the CUDA extension takes 1 to 16 rows, not 197"
    with caplog.at_level(logging.INFO, logger=_tune.__name__), pytest.warns(TuneWarning) as record:
        for key in (KEY, KEY[:3] + (512,) + KEY[4:]):  # two keys, the same reasons: said once
            choice = tuner.choose(key, candidates([], fail="triton:fused", ineligible={"cuda": reason}), "triton")
            assert choice == "torch"  # the failing fused path, fastest on paper, is not taken
    assert len(record) == 1
    assert str(record[0].message) == ("lowrank_linear: the measured choice passes over triton:fused, which failed: "
                                      "RuntimeError: triton:fused exploded")
    assert timer.calls == [["torch", "triton:split"]] * 2
    said = [r.getMessage() for r in caplog.records if "passes over" in r.getMessage()]
    assert said == ["lowrank_linear: the measured choice passes over triton:fused: RuntimeError: triton:fused exploded",
                    f"lowrank_linear: the measured choice passes over cuda: {reason}"]
    entry = next(iter(_tune.read_entries(tuner.path("cuda:0")).values()))
    assert entry["passed_over"] == {"cuda": reason, "triton:fused": "RuntimeError: triton:fused exploded"}


def test_nothing_that_runs_gives_the_fixed_rule_and_records_nothing(tmp_path, fake_names):
    tuner = Tuner(tmp_path, never_timed)
    with pytest.warns(TuneWarning):
        only = [Candidate("torch", None, "no"), Candidate("triton:fused", candidates([], fail="triton:fused")[1].run)]
        assert tuner.choose(KEY, only, fallback="triton") == "triton"
    assert not tuner.path("cuda:0").exists() and tuner.lookup(KEY) is None
    assert tuner.choose(KEY, [Candidate("torch", lambda: None)], "triton") == "torch"  # one runs: not timed


def test_the_cache_round_trips_to_a_later_process(tmp_path, fake_names):
    first = Tuner(tmp_path, FakeTimer({"torch": 3.0, "triton:fused": 2.0, "triton:split": 1.0, "cuda": 9.0}))
    assert first.choose(KEY, candidates([]), "triton") == "triton:split"
    later, ran = Tuner(tmp_path, never_timed), []  # a fresh chooser: what a new process starts with
    assert later.lookup(KEY) == "triton:split"
    assert later.choose(KEY, candidates(ran), "triton") == "triton:split" and ran == []


@pytest.mark.parametrize("change", ["device", "versions"])
def test_another_gpu_or_version_is_tuned_anew(tmp_path, fake_names, change):
    Tuner(tmp_path, FakeTimer({"torch": 3.0, "triton:fused": 2.0, "triton:split": 1.0, "cuda": 9.0})).choose(
        KEY, candidates([]), "triton")
    fake_names[change] = "NVIDIA A100-SXM4-80GB" if change == "device" else "torch=2.12 triton=3.6 ext=none"
    timer = FakeTimer({"torch": 1.0, "triton:fused": 2.0, "triton:split": 3.0, "cuda": 9.0})
    later = Tuner(tmp_path, timer)
    assert later.lookup(KEY) is None
    assert later.choose(KEY, candidates([]), "triton") == "torch" and len(timer.calls) == 1
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    entries = [e for f in tmp_path.glob("*.json") for e in _tune.read_entries(f).values()]
    assert sorted(e["choice"] for e in entries) == ["torch", "triton:split"]  # both kept
    assert files == (["nvidia-a100-sxm4-80gb.json", "nvidia-h200.json"] if change == "device" else ["nvidia-h200.json"])


def test_retuning_times_recorded_keys_again_once(tmp_path, fake_names, monkeypatch):
    timer = FakeTimer({"torch": 3.0, "triton:fused": 2.0, "triton:split": 1.0, "cuda": 9.0})
    monkeypatch.setattr(_tune, "_tuner", [Tuner(tmp_path, timer)])
    _tune.get_tuner().choose(KEY, candidates([]), "triton")
    timer.us["torch"] = 0.5
    with _tune.retuning() as tuner:
        assert tuner.choose(KEY, candidates([]), "triton") == "torch"
        assert tuner.choose(KEY, candidates([]), "triton") == "torch"
    assert len(timer.calls) == 2 and Tuner(tmp_path).lookup(KEY) == "torch"


def _write_many(path: str, worker: int, count: int, barrier) -> None:
    barrier.wait()
    for i in range(count):
        _tune.write_entries(path, {f"key {worker}-{i}": {"choice": "torch", "us": {}, "passed_over": {}}}, "dev")


def test_two_processes_writing_at_once_leave_a_valid_cache_with_both_entries(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    path, count = tmp_path / "tune" / "dev.json", 40
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_many, args=(str(path), w, count, barrier)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    data = json.loads(path.read_text())  # valid JSON
    assert data["format"] == _tune.TUNE_FORMAT
    assert sorted(data["entries"]) == sorted(f"key {w}-{i}" for w in range(2) for i in range(count))
    assert not list(path.parent.glob("*.tmp"))  # no temporary file left behind


def test_a_damaged_cache_file_is_read_as_empty_and_rewritten(tmp_path, fake_names):
    tuner = Tuner(tmp_path, FakeTimer({"torch": 1.0, "triton:fused": 2.0, "triton:split": 3.0, "cuda": 4.0}))
    tuner.path("cuda:0").write_text('{"format": "utilrank.tune/1", "entries": {"k": ')
    assert tuner.lookup(KEY) is None
    assert tuner.choose(KEY, candidates([]), "triton") == "torch"
    assert Tuner(tmp_path).lookup(KEY) == "torch"


def test_no_timing_inside_cuda_graph_capture(tmp_path, fake_names, monkeypatch):
    monkeypatch.setattr(_tune, "capturing", lambda: True)
    tuner, ran = Tuner(tmp_path, never_timed), []
    assert tuner.choose(KEY, candidates(ran), "triton") == "triton" and ran == []  # the fixed rule, no probe
    assert not tuner.path("cuda:0").exists()
    _tune.write_entries(tuner.path("cuda:0"), {_tune.disk_key(KEY): {"choice": "triton:split"}})
    assert tuner.choose(KEY, candidates(ran), "triton") == "triton:split" and ran == []  # the cache is read


def test_no_timing_under_torch_compile_tracing(tmp_path, fake_names, monkeypatch):
    """Under dynamo the recorded choice is read once, at trace time (a constant of the graph), or the fixed rule
    runs; nothing is probed or timed. ``fullgraph=True``: the lookup breaks no graph."""
    monkeypatch.setattr(_tune, "_tuner", [Tuner(tmp_path, never_timed)])
    ran = []

    def f(x):
        impl = _tune.pick("lowrank_linear", x, 4, (8, 8, 2), None, False, "triton",
                          lambda name: lambda: ran.append(name))
        return x * 2 if impl == "torch" else x * 3

    x = torch.ones(4, 8)
    torch.compiler.reset()
    assert torch.compile(f, backend="eager", fullgraph=True)(x).eq(3).all() and ran == []  # nothing recorded
    key = _tune.make_key("lowrank_linear", x, 4, (8, 8, 2), None, False)
    _tune.write_entries(_tune.get_tuner().path("cpu"), {_tune.disk_key(key): {"choice": "torch"}})
    torch.compiler.reset()
    assert torch.compile(f, backend="eager", fullgraph=True)(x).eq(2).all() and ran == []
    torch.compiler.reset()


def test_rows_are_bucketed_by_powers_of_two():
    assert [_tune.rows_bucket(m) for m in (0, 1, 2, 3, 16, 17, 197, 12608)] == [0, 1, 2, 4, 16, 32, 256, 16384]


# ------------------------------------------------------------------------------------------------
# The ops and modules on the measured choice (a faked GPU; CPU tensors stand in for CUDA ones)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def tuned_gpu(tmp_path, fake_names, monkeypatch):
    """CUDA faked for CPU tensors, Triton "installed", no extension; the fake kernels compute the torch reference
    and note which candidate ran; returns (the tuner's timer table, the list of what ran)."""
    timer = FakeTimer({"torch": 30.0, "triton:fused": 20.0, "triton:split": 25.0, "linears": 60.0})
    monkeypatch.setattr(_tune, "_tuner", [Tuner(tmp_path, timer)])
    monkeypatch.setattr(_dispatch, "on_cuda", lambda t: True)
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(_dispatch, "cuda_extension_loaded", lambda: False)
    monkeypatch.setattr(_dispatch, "_warned", set())
    ran = []
    real_linear, real_mlp = lowrank_ops.run_linear, lowrank_ops.run_mlp

    def fake_linear(impl, x, a, b, bias, activation):
        ran.append(("linear", impl))
        return real_linear("torch", x, a, b, bias, activation)

    def fake_mlp(impl, x, *params):
        if impl == "linears":
            return real_mlp(impl, x, *params)
        ran.append(("mlp", impl))
        return real_mlp("torch", x, *params)

    monkeypatch.setattr(lowrank_ops, "run_linear", fake_linear)
    monkeypatch.setattr(lowrank_ops, "run_mlp", fake_mlp)
    return timer, ran


def test_the_op_runs_the_measured_choice(tuned_gpu):
    timer, ran = tuned_gpu
    x, a, b, bias = torch.randn(197, 24), torch.randn(6, 24), torch.randn(40, 6), torch.randn(40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the extension not built is an expected reason: logged, not warned
        y = lowrank_linear(x, a, b, bias, "gelu")
    torch.testing.assert_close(y, F.gelu(x @ a.T @ b.T + bias))
    assert timer.calls == [["torch", "triton:fused", "triton:split"]] and ran[-1] == ("linear", "triton:fused")
    ran.clear()
    lowrank_linear(x[:150], a, b, bias, "gelu")  # the same bucket (129-256 rows): recorded, run at once
    assert ran == [("linear", "triton:fused")] and len(timer.calls) == 1
    lowrank_linear(x, a, b, bias, "relu")  # another activation: another key
    assert len(timer.calls) == 2


def test_the_switch_gives_the_fixed_rule_back(tuned_gpu, monkeypatch):
    timer, ran = tuned_gpu
    monkeypatch.setenv("UTILRANK_TUNE", "0")
    lowrank_linear(torch.randn(197, 24), torch.randn(6, 24), torch.randn(40, 6))
    assert ran == [("linear", "triton")] and timer.calls == []
    assert not list(_tune.get_tuner().folder.glob("*.json"))


def test_a_gradient_or_the_cpu_is_never_timed(tuned_gpu, monkeypatch):
    timer, ran = tuned_gpu
    a = torch.randn(6, 24, requires_grad=True)
    with pytest.warns(_dispatch.KernelFallbackWarning, match="gradient"):
        lowrank_linear(torch.randn(197, 24), a, torch.randn(40, 6))
    monkeypatch.setattr(_dispatch, "on_cuda", lambda t: False)  # the real CPU: the torch path, silently
    lowrank_linear(torch.randn(197, 24), a.detach(), torch.randn(40, 6))
    assert timer.calls == [] and ran == []


def test_torch_compile_reads_the_recorded_choice_and_times_nothing(tuned_gpu):
    """The front ends and ``LowRankMlp`` under ``torch.compile(fullgraph=True)``: the custom ops get the recorded
    choice (here: recorded by an eager call first), or the fixed rule's where none is; nothing is timed while
    tracing."""
    timer, ran = tuned_gpu
    model, x = mlp_model().bfloat16(), torch.randn(2, 100, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.compiler.reset()
        torch.compile(model, backend="eager", fullgraph=True)(x)
        assert timer.calls == [] and ran == [("mlp", "triton"), ("linear", "triton")]  # the fixed rule
        timer.us["linears"] = 1.0
        tune(model, x)  # eager: times and records
        ran.clear()
        calls = len(timer.calls)
        torch.compiler.reset()
        torch.testing.assert_close(torch.compile(model, backend="eager", fullgraph=True)(x),
                                   set_torch(mlp_model().bfloat16())(x))
    assert len(timer.calls) == calls and ran == [("linear", "triton:fused")] * 3
    torch.compiler.reset()


def mlp_model(activation="gelu"):
    torch.manual_seed(0)
    fc1, fc2 = LowRankLinear(24, 96, 8), LowRankLinear(96, 24, 8)
    return nn.Sequential(LowRankMlp(fc1, fc2, activation), LowRankLinear(24, 10, 4)).eval()


@pytest.mark.parametrize("fastest", ["triton:fused", "linears"])
def test_the_mlp_fused_op_against_two_factored_linears(tuned_gpu, fastest):
    """``tune(model, x)`` times the MLP's fused op against two factored linears (each linear's own candidates
    timed first) and the lone linear's candidates; the choices are what the model then runs, layer by layer."""
    timer, ran = tuned_gpu
    timer.us[fastest] = 1.0
    model, x = mlp_model().bfloat16(), torch.randn(2, 100, 24, dtype=torch.bfloat16)
    layers = tune(model, x)
    assert [d["layer"] for d in layers] == ["0", "1"] and [d["module"] for d in layers] == ["LowRankMlp",
                                                                                            "LowRankLinear"]
    expected = "triton:fused" if fastest == "triton:fused" else "linears(triton:fused+triton:fused)"
    assert layers[0]["backend"] == expected and layers[1]["backend"] == "triton:fused"
    assert ["linears", "triton:fused"] in timer.calls  # the fused MLP against two linears ("cuda": not built)
    ran.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(x), set_torch(mlp_model().bfloat16())(x))
    assert ran == ([("mlp", "triton:fused")] if fastest == "triton:fused" else [("linear", "triton:fused")] * 2) + [
        ("linear", "triton:fused")]
    assert layer_backends(model, x) == layers


def set_torch(model):
    from utilrank_kernels.nn import set_backend

    return set_backend(model, "torch")


def test_the_fp32_mlp_passes_over_the_fused_kernel(tuned_gpu, caplog):
    timer, _ = tuned_gpu
    with caplog.at_level(logging.INFO, logger=_tune.__name__):
        tune(mlp_model(), torch.randn(2, 100, 24))
    assert ["linears"] not in timer.calls  # one candidate left: nothing to time
    assert any("passes over triton:fused: the fused MLP kernel takes 16-bit inputs, not float32" in r.getMessage()
               for r in caplog.records)


def test_cpu_is_unchanged(monkeypatch, tmp_path):
    """No fakes: the CPU runs the torch path and nothing is timed, read or written."""
    monkeypatch.setattr(_tune, "_tuner", [Tuner(tmp_path, never_timed)])
    model, x = mlp_model(), torch.randn(2, 5, 24)
    assert {d["backend"] for d in tune(model, x, retune=True)} == {"torch"}
    assert not list(tmp_path.iterdir())


def test_bench_tune_lists_each_layers_backend(tmp_path, capsys, one_thread):
    out = tmp_path / "r.json"
    assert main(["bench", "--model", "vit-digits", "--param-ratio", "0.5", "--batch-sizes", "2", "--warmup", "1",
                 "--iters", "2", "--no-plot", "--tune", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tune: nothing is timed on cpu" in text
    compressed = json.loads(out.read_text())["rows"][1]
    assert compressed["variant"] == "compressed" and compressed["layer_backends"]
    assert {d["backend"] for d in compressed["layer_backends"]} == {"torch"}
    assert f"layers: torch {len(compressed['layer_backends'])}" in text


# ------------------------------------------------------------------------------------------------
# The torch path's cuBLASLt epilogue
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def addmm_calls(monkeypatch):
    calls = []
    real = torch._addmm_activation

    def counted(*args, **kwargs):
        calls.append(kwargs.get("use_gelu"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_addmm_activation", counted)
    return calls


def operands(dtype=torch.float64, m=(3, 17), k=24, r=6, n=40):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g, dtype=dtype) for s in ((*m, k), (r, k), (n, r), (n,))]


def test_the_relu_epilogue_equals_two_calls_in_fp64(monkeypatch, addmm_calls):
    """The epilogue path, run on the CPU (``_addmm_activation`` runs there too), against the fp64 reference."""
    monkeypatch.setattr(lowrank_ops, "EPILOGUE_DEVICES", ("cpu",))
    x, a, b, bias = operands()
    y = lowrank_ops.lowrank_linear_reference(x, a, b, bias, "relu")
    assert addmm_calls == [False] and y.shape == (3, 17, 40)
    torch.testing.assert_close(y, torch.relu(x @ a.T @ b.T + bias), rtol=1e-12, atol=1e-12)
    y32 = lowrank_ops.lowrank_linear_reference(*(t.float() for t in (x, a, b, bias)), "relu")
    assert addmm_calls == [False, False]
    torch.testing.assert_close(y32.double(), torch.relu(x @ a.T @ b.T + bias), rtol=1e-5, atol=1e-5)


def test_gelu_on_the_cpu_is_erf_gelu_so_the_epilogue_stays_on_cuda():
    """On CUDA ``_addmm_activation(use_gelu=True)`` is the tanh GELU (cuBLASLt's epilogue, and torch's own
    fallback there); on the CPU it is erf GELU. So the epilogue serves "gelu_tanh" on CUDA only, and erf "gelu"
    (nn.GELU's default) never takes it."""
    x, a, b, bias = operands()
    t = (x @ a.T).reshape(-1, 6)
    y = torch._addmm_activation(bias, t, b.t(), use_gelu=True)
    torch.testing.assert_close(y, F.gelu(t @ b.T + bias), rtol=1e-12, atol=1e-12)
    assert lowrank_ops.EPILOGUE_DEVICES == ("cuda",) and "gelu" not in lowrank_ops.EPILOGUE_ACTIVATIONS


@pytest.mark.parametrize("case", ["gelu-erf", "no-bias", "gradient", "flop-counter", "autocast", "cpu"])
def test_where_the_epilogue_does_not_apply(monkeypatch, addmm_calls, case):
    from torch.utils.flop_counter import FlopCounterMode

    if case != "cpu":
        monkeypatch.setattr(lowrank_ops, "EPILOGUE_DEVICES", ("cpu",))
    x, a, b, bias = operands(torch.float32)
    activation = "gelu" if case == "gelu-erf" else "relu"
    if case == "no-bias":
        bias = None
    if case == "gradient":
        a.requires_grad_(True)
    modes = {"flop-counter": lambda: FlopCounterMode(display=False),
             "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}  # t in bf16, b and bias in fp32
    with modes.get(case, warnings.catch_warnings)():
        y = lowrank_ops.lowrank_linear_reference(x, a, b, bias, activation)
    assert addmm_calls == []
    ref = x @ a.T @ b.T + (0 if bias is None else bias)
    rtol, atol = (2e-2, 0.5) if case == "autocast" else (1e-5, 1e-5)  # bf16: an ulp is 0.125 at 16
    torch.testing.assert_close(y.float(), F.gelu(ref) if activation == "gelu" else torch.relu(ref), rtol=rtol,
                               atol=atol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
def test_the_cuda_epilogue_against_fp64(addmm_calls, dtype, activation):
    x, a, b, bias = (t.to("cuda", dtype) for t in operands(m=(197,), k=768, r=96, n=3072))
    with torch.no_grad():
        y = lowrank_ops.lowrank_linear_reference(x, a, b, bias, activation)
    assert addmm_calls == [activation == "gelu_tanh"]
    x64, a64, b64, bias64 = (t.double() for t in (x, a, b, bias))
    t = (x64 @ a64.T).to(dtype).double()  # the torch path rounds t to the input dtype
    ref = lowrank_ops.apply_activation(t @ b64.T + bias64, activation)
    two_calls = lowrank_ops.apply_activation(F.linear(F.linear(x, a), b, bias), activation)
    err, err_two = (y.double() - ref).abs().max(), (two_calls.double() - ref).abs().max()
    assert err <= 2 * err_two + 1e-6, (err, err_two)
