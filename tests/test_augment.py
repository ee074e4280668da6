"""Augmentation: batched crops and flips, their seeding, cached teacher views, online
teachers, the spec's checks, and both modes through `kdtune search`."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from kdtune.core.augment import apply_views, draw_view_params, padding_for, resolve_augment, view_indices
from kdtune.core.distill import RunConfig, run
from kdtune.core.teacher import (
    TeacherConfig,
    online_targets,
    prepare_teachers,
    prepare_views,
    teacher_networks,
    views_cache_key,
)
from kdtune.errors import ConfigError, KdtuneError
from kdtune.spec import parse_spec
from tests.conftest import TINY_SPEC, write_spec

CROP = {"crop": True, "padding": None, "flip": False}
CROP_FLIP = {"crop": True, "padding": 2, "flip": True}
TEACHER = TeacherConfig(family="mlp", width=64, epochs=2, augment=CROP)


# --------------------------------------------------------------------------- settings and ops


def test_policies_resolve_per_dataset():
    assert resolve_augment("standard", "cifar10") == {"crop": True, "padding": None, "flip": True}
    assert resolve_augment("standard", "digits") == {"crop": True, "padding": None, "flip": False}
    assert resolve_augment("standard", "mnist")["flip"] is False
    assert resolve_augment({"policy": "standard", "flip": True}, "digits")["flip"] is True  # explicit wins
    assert resolve_augment({"crop": True, "padding": 4}, "cifar100") == {"crop": True, "padding": 4, "flip": False}
    assert resolve_augment("none", "cifar10") is None and resolve_augment(None, "cifar10") is None
    assert padding_for(resolve_augment("standard", "cifar10"), 32) == 4  # crop 32, padding 4
    assert padding_for(resolve_augment("standard", "digits"), 8) == 1


def test_batched_crop_and_flip_match_a_per_sample_reference():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(16, 3, 8, 8, generator=generator)
    params = draw_view_params(CROP_FLIP, 16, 8, seed=5, index=1)
    assert params[:, :2].min() >= 0 and params[:, :2].max() <= 4 and set(params[:, 2].tolist()) == {0, 1}
    out = apply_views(x, params, padding=2)
    padded = F.pad(x, (2, 2, 2, 2))
    for i, (dy, dx, flip) in enumerate(params.tolist()):
        window = padded[i, :, dy:dy + 8, dx:dx + 8]
        assert torch.equal(out[i], window.flip(-1) if flip else window)
    assert out.is_contiguous()


def test_same_seed_gives_the_same_views_and_other_epochs_or_seeds_other_views():
    a = draw_view_params(CROP_FLIP, 500, 8, seed=0, index=1)
    assert torch.equal(a, draw_view_params(CROP_FLIP, 500, 8, seed=0, index=1))
    assert not torch.equal(a, draw_view_params(CROP_FLIP, 500, 8, seed=0, index=2))
    assert not torch.equal(a, draw_view_params(CROP_FLIP, 500, 8, seed=1, index=1))
    # Picks: cycle replays view (epoch - 1) mod K; random is seeded per (seed, epoch, sample).
    assert view_indices(4, 3, 6, "cycle", 0).tolist() == [1, 1, 1]
    assert torch.equal(view_indices(4, 50, 2, "random", 7), view_indices(4, 50, 2, "random", 7))
    assert not torch.equal(view_indices(4, 50, 2, "random", 7), view_indices(4, 50, 3, "random", 7))


def test_augmentation_off_leaves_a_run_bit_identical(digits, one_torch_thread):
    config = RunConfig(width=16, epochs=2, alpha=1.0, train_subset=200)
    plain = run(config, digits).history
    again = run(config.replace(augment=None), digits).history
    augmented = run(config.replace(augment=CROP), digits).history
    assert [h["train_loss"] for h in plain] == [h["train_loss"] for h in again]
    assert [h["train_loss"] for h in plain] != [h["train_loss"] for h in augmented]


# --------------------------------------------------------------------------- cached views


@pytest.fixture(scope="module")
def prepared(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_cache")
    return prepare_teachers([TEACHER], digits, root, log=lambda m: None)


def _count_forwards(models) -> list[int]:
    calls = [0]
    for model in models:
        for module in model.modules():
            if not list(module.children()):  # count each leaf layer's calls
                module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cached_views_are_the_teachers_logits_on_the_replayed_images(digits, prepared):
    views = prepare_views(prepared, [TEACHER], digits, CROP, 3, seed=4, log=lambda m: None)
    n = len(digits.train)
    assert views.logits.dtype == np.float16 and views.logits.shape == (3 * n, digits.num_classes)
    teacher = teacher_networks(prepared, [TEACHER], digits)[0]
    params = torch.from_numpy(views.view_params).long()
    # Independently: view 2 of images 0..99 are those images shifted as drawn with the cache's seed.
    assert torch.equal(params[2], draw_view_params(CROP, n, 8, seed=4, index=2, stream="views"))
    with torch.no_grad():
        expected = teacher(apply_views(digits.train.x[:100], params[2, :100], padding=1))
    got = torch.from_numpy(views.logits[2 * n:2 * n + 100].astype(np.float32))
    assert torch.allclose(got, expected, atol=2e-2, rtol=1e-2)


def test_a_views_run_does_no_teacher_forward_pass_and_an_online_run_one_per_batch(digits, prepared, one_torch_thread):
    views = prepare_views(prepared, [TEACHER], digits, CROP, 2, log=lambda m: None)
    online = online_targets(prepared, [TEACHER], digits)
    online_calls = _count_forwards([online.online_model])
    # The views' teacher, loaded fresh, is watched too: nothing may run it.
    watched = teacher_networks(prepared, [TEACHER], digits)
    view_calls = _count_forwards(watched)
    config = RunConfig(width=16, epochs=2, augment=CROP, train_subset=128, batch_size=32)
    run(config.replace(teacher_targets="views"), digits, views)
    assert view_calls[0] == 0
    run(config.replace(teacher_targets="online"), digits, online)
    layers = sum(1 for m in online.online_model.modules() if not list(m.children()))
    assert online_calls[0] == 2 * (128 // 32) * layers  # every batch of both epochs


def test_views_cache_key_covers_augmentation_k_and_seed(prepared):
    key = views_cache_key(prepared.key, CROP, 4, 0)
    assert key == views_cache_key(prepared.key, dict(CROP), 4, 0)
    others = {views_cache_key(prepared.key, CROP_FLIP, 4, 0), views_cache_key(prepared.key, CROP, 16, 0),
              views_cache_key(prepared.key, CROP, 4, 1), views_cache_key("another-teacher", CROP, 4, 0)}
    assert key not in others and len(others) == 4


def test_views_another_process_placed_first_are_used_and_no_staging_folder_is_left(digits, prepared, tmp_path,
                                                                                   monkeypatch):
    import hashlib
    import shutil

    import kdtune.core.teacher as teacher_module

    prepare_views(prepared, [TEACHER], digits, CROP, 2, seed=11, log=lambda m: None)
    entry = prepared.cache_dir.parent / f"views-{views_cache_key(prepared.key, CROP, 2, 11)}"
    theirs = tmp_path / "theirs"
    shutil.move(entry, theirs)
    marked = np.full(np.load(theirs / "views.npy").shape, 0.5, dtype=np.float16)  # told apart from ours
    np.save(theirs / "views.npy", marked)
    meta = json.loads((theirs / "meta.json").read_text())
    meta["files"]["views.npy"] = hashlib.sha256((theirs / "views.npy").read_bytes()).hexdigest()
    (theirs / "meta.json").write_text(json.dumps(meta))
    real_apply_views = teacher_module.apply_views

    def second_process_finishes_first(*args, **kwargs):  # while this process computes its views
        if not entry.exists():
            shutil.copytree(theirs, entry)
        return real_apply_views(*args, **kwargs)

    monkeypatch.setattr(teacher_module, "apply_views", second_process_finishes_first)
    logs: list[str] = []
    views = prepare_views(prepared, [TEACHER], digits, CROP, 2, seed=11, log=logs.append)
    assert np.array_equal(views.logits, marked.reshape(-1, digits.num_classes))
    assert any("written meanwhile by another process" in line for line in logs)
    assert not [p.name for p in entry.parent.iterdir() if p.name.startswith(".views-")]


def test_corrupted_views_file_is_detected_and_rebuilt(digits, prepared):
    logs: list[str] = []
    first = prepare_views(prepared, [TEACHER], digits, CROP, 2, seed=9, log=logs.append)
    entry = prepared.cache_dir.parent / f"views-{views_cache_key(prepared.key, CROP, 2, 9)}"
    hit = prepare_views(prepared, [TEACHER], digits, CROP, 2, seed=9, log=logs.append)
    assert any("cache hit" in line for line in logs)
    assert np.array_equal(hit.logits, first.logits)
    raw = bytearray((entry / "views.npy").read_bytes())
    raw[-7] ^= 0xFF
    (entry / "views.npy").write_bytes(bytes(raw))
    logs.clear()
    rebuilt = prepare_views(prepared, [TEACHER], digits, CROP, 2, seed=9, log=logs.append)
    assert any("corrupted" in line and "rebuilding" in line for line in logs)
    assert np.array_equal(rebuilt.logits, first.logits)
    assert json.loads((entry / "meta.json").read_text())["views"] == 2


def test_resumed_run_replays_the_same_views(digits, prepared, one_torch_thread):
    for targets, mode, pick in ((prepare_views(prepared, [TEACHER], digits, CROP, 2, log=lambda m: None), "views",
                                 "random"), (None, "logits", "cycle")):
        config = RunConfig(width=16, epochs=3, augment=CROP, train_subset=200, teacher_targets=mode,
                           view_pick=pick, alpha=0.5 if targets is not None else 1.0)
        states = {}
        whole = run(config, digits, targets, on_checkpoint=lambda e, s: states.__setitem__(e, copy.deepcopy(s)),
                    checkpoint_every=1)
        resumed = run(config, digits, targets, resume_state=states[1])
        assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in whole.history]
        assert [h["val_acc"] for h in resumed.history] == [h["val_acc"] for h in whole.history]


def test_cached_logits_refuse_augmented_runs_and_views_refuse_other_augmentation(digits, prepared):
    with pytest.raises(ConfigError, match="views .*or online"):
        run(RunConfig(width=8, epochs=1, augment=CROP), digits, prepared.targets)
    views = prepare_views(prepared, [TEACHER], digits, CROP, 1, log=lambda m: None)
    with pytest.raises(ConfigError, match="rebuild the views"):
        run(RunConfig(width=8, epochs=1, augment=CROP_FLIP, teacher_targets="views"), digits, views)


# --------------------------------------------------------------------------- spec and plan


def _spec(**changes):
    return parse_spec({**TINY_SPEC, **changes}, "spec.yaml")


def test_spec_defaults_to_views_with_augmentation_and_logits_without():
    assert _spec().targets_mode() == "logits"
    spec = _spec(data={**TINY_SPEC["data"], "augment": "standard"})
    assert spec.targets_mode() == "views" and spec.teacher_targets.k == 1


@pytest.mark.parametrize("changes, needle", [
    ({"data": {"dataset": "digits", "augment": "standard"}, "teacher_targets": {"mode": "logits"}},
     "allowed with data.augment: views"),
    ({"teacher_targets": {"mode": "views"}}, "set data.augment"),
    ({"data": {"dataset": "digits", "augment": "standard"}, "space": {**TINY_SPEC["space"], "beta": 0.5}},
     "use mode online"),
    ({"data": {"dataset": "digits", "augment": {"padding": -1, "crop": True}}}, "data.augment: padding"),
    ({"teacher_targets": {"mode": "cached"}}, "teacher_targets.mode"),
])
def test_spec_refuses_targets_that_cannot_serve_the_augmentation(changes, needle):
    with pytest.raises(KdtuneError, match=needle):
        _spec(**changes)


def test_a_teacher_given_only_as_logits_with_augmentation_is_refused_by_the_spec(tmp_path):
    logits = tmp_path / "teacher_logits.npz"
    logits.write_bytes(b"")  # the spec checks the combination before reading the file
    with pytest.raises(KdtuneError, match="teacher.logits: precomputed logits cannot follow augmented inputs"):
        _spec(data={"dataset": "digits", "augment": "standard"}, teacher={"logits": str(logits)})


def test_views_that_do_not_fit_the_object_store_are_refused_with_what_would(digits):
    from kdtune.search.plan import check_views_fit

    spec = _spec(data={"dataset": "digits", "augment": "standard"}, teacher_targets={"k": 16})
    n = len(digits.train)
    line = check_views_fit(spec, digits, [1e9])
    assert f"16 views x {n:,} images x 10 classes" in line
    data_bytes = 4 * (digits.train.x.nelement() + digits.val.x.nelement()) + 8 * (n + len(digits.val))
    store = (data_bytes + 5 * n * 10 * 2) / 0.8  # room for exactly 5 views
    with pytest.raises(ConfigError) as raised:
        check_views_fit(spec, digits, [1e9, store])
    assert "k <= 5" in str(raised.value) and "mode: online" in str(raised.value)


# --------------------------------------------------------------------------- through `kdtune search`


@pytest.mark.parametrize("mode", ["views", "online"])
def test_views_and_online_searches_complete_with_their_mode_in_the_tables(ray_session, tmp_path, mode):
    from kdtune.search import search

    spec = {**TINY_SPEC, "study": f"aug_{mode}", "num_samples": 2, "baselines": False,
            "data": {**TINY_SPEC["data"], "augment": "standard"},
            "teacher": {**TINY_SPEC["teacher"], "epochs": 2},
            "teacher_targets": {"mode": mode, "k": 2},
            "student": {**TINY_SPEC["student"], "lr_schedule": {"kind": "cosine", "warmup": 1}},
            "space": {**TINY_SPEC["space"], "epochs": 2, "alpha": 0.5},
            "early_stopping": {"rule": "none"}}
    logs: list[str] = []
    result = search(write_spec(tmp_path, spec), results_root=tmp_path / "results", log=logs.append)
    trials = pd.read_parquet(result.study_dir / "trials.parquet")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"}
    assert set(trials["teacher_targets"]) == {mode}
    history = pd.read_parquet(result.study_dir / "history.parquet")
    assert history["lr"].notna().all()
    if mode == "views":
        assert any(line.startswith("teacher views: 2 views x") for line in logs)
        assert list((result.study_dir / "teacher").glob("views-*/views.npy"))
        # The final evaluation re-trains the front on the same kind of targets (cache hit, no rebuild).
        from kdtune.results.evaluate import final_evaluation

        logs.clear()
        table = final_evaluation(result.study_dir, seeds=1, log=logs.append)
        assert len(table) >= 1 and table["test_acc_mean"].notna().all()
        assert any("teacher views cache hit" in line for line in logs)
