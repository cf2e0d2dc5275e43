"""Stage I as a long job: out-of-memory recovery, interrupted runs, divergence, precision."""

import contextlib

import pytest
import torch
from edit_helpers import interrupt_at_the_end

import emcid
from emcid.cache import TensorCache
from emcid.config import Runtime
from emcid.editors.emcid import stage1
from emcid.editors.emcid.stage1 import Stage1Config, compute_targets, engine, schedule

REQUESTS = [emcid.EditRequest("tench", "goldfish"), emcid.EditRequest("zebra", "horse", seed=4),
            emcid.EditRequest("castle", "tower", ("{}", "a {} on a hill"), seed=2),
            emcid.EditRequest("lobster", "crab", seed=7)]
LAYER = {"text_encoder": 2}


def _deltas(targets) -> list[torch.Tensor]:
    return [t.deltas["text_encoder"] for t in targets]


def test_out_of_memory_halves_the_batch_and_keeps_finished_concepts(sd1, monkeypatch):
    config, runtime = Stage1Config(steps=4), Runtime(concept_batch=4)
    expected = compute_targets(sd1, REQUESTS, LAYER, config, TensorCache("oom-reference"),
                               progress=False, runtime=runtime)
    sizes, original = [], schedule.compute_z

    def short_of_memory(bundle, requests, *args, **kwargs):
        sizes.append(len(requests))
        if len(requests) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(bundle, requests, *args, **kwargs)

    monkeypatch.setattr(schedule, "compute_z", short_of_memory)
    cache = TensorCache("oom")
    found = compute_targets(sd1, REQUESTS, LAYER, config, cache, progress=False, runtime=runtime)
    assert sizes == [4, 2, 2]
    assert len(list(cache.folder.glob("*.safetensors"))) == 4
    for a, b in zip(_deltas(expected), _deltas(found)):
        assert torch.allclose(a, b, atol=1e-4) and b.norm() > 0


def test_out_of_memory_at_one_concept_is_a_clear_error(sd1, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(schedule, "compute_z", no_memory)
    with pytest.raises(emcid.EmcidError, match="even with one concept"):
        compute_targets(sd1, REQUESTS[:2], LAYER, Stage1Config(steps=2), TensorCache("oom-one"),
                        progress=False, runtime=Runtime(concept_batch=2))


def test_interrupted_stage1_resumes_bit_identically(sd1, monkeypatch):
    config, runtime = Stage1Config(steps=7), Runtime(concept_batch=4, checkpoint_every=3)
    expected = compute_targets(sd1, REQUESTS, LAYER, config, TensorCache("resume-reference"),
                               progress=False, runtime=runtime)
    cache = TensorCache("resume")
    interrupt_at_the_end(sd1, REQUESTS, LAYER, config, cache, runtime, monkeypatch)
    resumed_from = []
    compute_z = schedule.compute_z

    def recording(bundle, requests, z_layer, cfg, images, run, resume=None, save_progress=None,
                  report=None, **kwargs):
        resumed_from.append(None if resume is None else int(resume[0]["step"]))
        return compute_z(bundle, requests, z_layer, cfg, images, run, resume, save_progress, report,
                         **kwargs)

    monkeypatch.setattr(schedule, "compute_z", recording)
    found = compute_targets(sd1, REQUESTS, LAYER, config, cache, progress=False, runtime=runtime)
    assert resumed_from == [6]
    for a, b in zip(_deltas(expected), _deltas(found)):
        assert torch.equal(a, b)
    assert [t.final_loss for t in expected] == [t.final_loss for t in found]
    progress = TensorCache("resume-progress")
    assert not list(progress.folder.glob("*.safetensors"))  # removed once finished


def test_progress_counts_concept_steps_with_the_running_loss(sd1):
    """Reported at every checkpoint (where the loop syncs anyway), so one batch of all concepts
    still moves the bar."""
    reports = []
    schedule.compute_z(sd1, REQUESTS[:2], LAYER, Stage1Config(steps=5), TensorCache("report"),
                       Runtime(checkpoint_every=2), report=lambda n, loss: reports.append((n, loss)))
    assert [n for n, _ in reports] == [4, 4, 2]  # 2 concepts x steps 1-2, 3-4, 5
    assert all(loss > 0 and loss == loss for _, loss in reports)


def test_a_delta_that_overflows_names_the_concept(sd1):
    with pytest.raises(emcid.EmcidError, match="'tench' -> 'goldfish'.*(overflow|not finite)"):
        emcid.edit(sd1, [REQUESTS[0]], progress=False, steps=3, lr=1e30, cache=False)
    with pytest.raises(emcid.EmcidError, match="lr=inf"):  # refused before any work
        emcid.edit(sd1, [REQUESTS[0]], progress=False, steps=3, lr=float("inf"), cache=False)


def test_a_delta_that_never_moves_names_the_concept(sd1):
    """No loss term reaches delta (both weights and the decay off): nothing is learnt."""
    with pytest.raises(emcid.EmcidError, match="did not move delta for 'zebra' -> 'horse'"):
        compute_targets(sd1, [REQUESTS[1]], LAYER,
                        Stage1Config(steps=2, noise_weight=0.0, align_weight=0.0, norm_decay=0.0),
                        TensorCache("frozen", enabled=False), progress=False)


def test_gradient_checkpointing_changes_nothing(sd1):
    plain = compute_targets(sd1, REQUESTS[:2], LAYER, Stage1Config(steps=3),
                            TensorCache("ckpt-off", enabled=False), progress=False)
    checkpointed = compute_targets(sd1, REQUESTS[:2], LAYER, Stage1Config(steps=3),
                                   TensorCache("ckpt-on", enabled=False), progress=False,
                                   runtime=Runtime(grad_checkpointing=True))
    for a, b in zip(_deltas(plain), _deltas(checkpointed)):
        assert torch.allclose(a, b, atol=1e-6)
    assert not sd1.unet.is_gradient_checkpointing  # switched off again


def test_bf16_autocast_stays_close_to_fp32_and_is_keyed_apart(sd1, monkeypatch):
    fp32 = compute_targets(sd1, REQUESTS[:2], LAYER, Stage1Config(steps=5), TensorCache("p32"),
                           progress=False)
    cache = TensorCache("p16")
    bf16 = compute_targets(sd1, REQUESTS[:2], LAYER, Stage1Config(steps=5), cache, progress=False,
                           runtime=Runtime(precision="bf16"))
    for a, b in zip(_deltas(fp32), _deltas(bf16)):
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
        assert not torch.equal(a, b)  # it did run in bf16
    model = sd1.fingerprint()
    keys = {stage1.cache_key_for(model, REQUESTS[0], LAYER, Stage1Config(), {}, sd1.device, p)
            for p in ("auto", "fp32", "bf16")}
    assert len(keys) == 2  # auto is fp32 on the CPU


def test_missing_cuda_device_is_a_clear_error(sd1_dir):
    with pytest.raises(emcid.EmcidError, match="cuda:7"):
        emcid.load_model(sd1_dir, device="cuda:7")


def test_cli_names_a_missing_device_in_one_line(sd1_dir, tmp_path, capsys):
    from emcid.cli import main

    requests = tmp_path / "r.yaml"
    requests.write_text("- {source: tench, destination: goldfish}\n")
    code = main(["edit", "--model", str(sd1_dir), "--requests", str(requests), "--out",
                 str(tmp_path / "p.safetensors"), "--device", "cuda:5", "--concept-batch", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "cuda:5" in err and len(err.strip().splitlines()) == 1


def test_batch_without_a_cap_is_the_cpu_default_on_a_cpu(sd1):
    """concept_batch=None: cpu_concept_batch on a CPU (on CUDA, as many as fit), never more than
    there are concepts; a set concept_batch caps the batch on any device."""
    sizes = {}
    for runtime in (Runtime(), Runtime(cpu_concept_batch=3), Runtime(cpu_concept_batch=64),
                    Runtime(concept_batch=2, cpu_concept_batch=3)):
        sizes[(runtime.concept_batch, runtime.cpu_concept_batch)] = stage1.fitting_batch(
            sd1, REQUESTS, LAYER, Stage1Config(steps=1), TensorCache("fit", enabled=False), runtime)
    assert sizes == {(None, 8): 4, (None, 3): 3, (None, 64): 4, (2, 3): 2}
    with pytest.raises(emcid.EmcidError, match="cpu_concept_batch"):
        Runtime(cpu_concept_batch=0)


def test_cuda_graphs_switch_is_checked_and_changes_nothing_off_cuda(sd1):
    """The switch only acts on CUDA (tests/test_stage1_cuda.py covers it there)."""
    with pytest.raises(emcid.EmcidError, match="cuda_graphs"):
        Runtime(cuda_graphs="no")
    found = [compute_targets(sd1, REQUESTS[:2], LAYER, Stage1Config(steps=5),
                             TensorCache(f"graphs-{graphs}", enabled=False), progress=False,
                             runtime=Runtime(cuda_graphs=graphs)) for graphs in (True, False)]
    for a, b in zip(*map(_deltas, found)):
        assert torch.equal(a, b) and a.norm() > 0


def test_a_failed_graph_capture_goes_on_with_eager_steps(sd1, monkeypatch, caplog):
    """Where CUDA graph capture fails (an operation it cannot hold), Stage I warns and goes on
    with eager steps: the results are those of a run without graphs. The CUDA calls around
    the capture are stood in for, so this runs on a CPU."""

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    def capture_fails(graph):
        raise RuntimeError("operation not permitted when stream is capturing")

    for name, stand_in in {"Stream": Stream, "current_stream": Stream, "synchronize": lambda d=None: None,
                           "empty_cache": lambda: None, "CUDAGraph": object, "graph": capture_fails,
                           "stream": lambda s: contextlib.nullcontext(),
                           "device": lambda d: contextlib.nullcontext()}.items():
        monkeypatch.setattr(torch.cuda, name, stand_in)
    stepper = engine.Stepper
    monkeypatch.setattr(engine, "Stepper", lambda step, optimiser, device, graphs:
                        stepper(step, optimiser, device, True))
    config = Stage1Config(steps=stepper.WARMUP + 3)
    with caplog.at_level("WARNING", logger=stage1.__name__):
        found = compute_targets(sd1, REQUESTS[:2], LAYER, config, TensorCache("failed", enabled=False),
                                progress=False)
    assert "CUDA graph capture failed" in caplog.text
    monkeypatch.setattr(engine, "Stepper", stepper)
    expected = compute_targets(sd1, REQUESTS[:2], LAYER, config, TensorCache("eager", enabled=False),
                               progress=False)
    for a, b in zip(_deltas(expected), _deltas(found)):
        assert torch.equal(a, b) and a.norm() > 0


def test_the_images_are_drawn_under_a_bar_before_their_batch(sd1, monkeypatch):
    images = TensorCache("drawn-first")
    seen = []
    original = schedule.compute_z

    def counting(*args, **kwargs):
        seen.append(len(list(images.folder.glob("*.safetensors"))))
        return original(*args, **kwargs)

    monkeypatch.setattr(schedule, "compute_z", counting)
    compute_targets(sd1, REQUESTS[:2], LAYER, Stage1Config(steps=1), TensorCache("drawn-targets"),
                    images, progress=True, runtime=Runtime(concept_batch=2))
    # each prompt's source image and the unedited model's image of its destination
    assert seen == [2 * sum(len(r.prompts) for r in REQUESTS[:2])]
