"""`compress.prune` from Python: a checkpoint (ours or Hugging Face) + calibration data -> a written student
that equals pruning by hand, with its provenance, scores, search table and tokenizer."""

import json

import pytest
import torch

from hybridlm.compress import PruneConfig, prune
from hybridlm.compress.importance import Importance, calibration_batches, compute_importance
from hybridlm.compress.pruning import PruneSpec, prune_model
from hybridlm.config import HybridConfig
from hybridlm.interop.checkpoint import load_model, save_model
from hybridlm.interop.hf_weights import save_hf_dir
from hybridlm.model import HybridLM
from hybridlm.training.dataset import TokenDataset

from helpers import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def teacher_dir(tmp_path):
    torch.manual_seed(0)
    save_model(HybridLM(HybridConfig(**TINY_MODEL)), tmp_path / "teacher")
    (tmp_path / "teacher" / "tokenizer.json").write_text("{}")  # copied as is, not parsed
    return tmp_path / "teacher"


def test_prune_explicit_shape_equals_pruning_by_hand(teacher_dir, tmp_path, small_shards):
    config = PruneConfig(d_model=48, ffn_dim=96, drop_layers="1", calib_seqs=4, seq_len=32, batch_size=2)
    r = prune(teacher_dir, tmp_path / "student", config, data=small_shards)
    teacher = load_model(teacher_dir)
    batches = calibration_batches(TokenDataset(small_shards, "train"), 4, 32, 2)
    by_hand = prune_model(teacher, compute_importance(teacher, batches, depth=True), r.spec).eval()
    student = load_model(r.out)
    assert r.spec == PruneSpec(48, 96, teacher.cfg.mamba_heads, 2, 1, (1,))
    assert student.cfg == by_hand.cfg and student.cfg.pattern == "M*-"
    ids = torch.randint(0, 4096, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(student(ids), by_hand(ids))
    assert r.params_before == teacher.num_params() and r.params_after == student.num_params()
    assert r.kl is not None and r.kl > 0 and r.table is None
    meta = json.loads((r.out / "config.json").read_text())
    assert meta["pruned_from"] == str(teacher_dir) and meta["prune_spec"]["drop_layers"] == [1]
    assert (r.out / "tokenizer.json").read_text() == "{}"
    assert Importance.load(r.out / "importance.json").pattern == teacher.cfg.pattern


def test_prune_search_from_a_hugging_face_directory_with_saved_scores(teacher_dir, tmp_path, small_shards):
    first = prune(teacher_dir, tmp_path / "a", PruneConfig(target_params="0.7x", calib_seqs=4, seq_len=32),
                  data=small_shards, progress=False)
    assert first.table and (tmp_path / "a" / "prune_search.json").is_file()
    assert 0.67 * first.params_before <= first.params_after <= 0.7 * first.params_before
    save_hf_dir(load_model(teacher_dir), tmp_path / "hf")
    again = prune(tmp_path / "hf", tmp_path / "b",
                  PruneConfig(d_model=first.spec.d_model, importance=str(tmp_path / "a" / "importance.json")))
    assert again.kl is None  # no calibration data given
    assert again.model.cfg.d_model == first.spec.d_model and load_model(tmp_path / "b").cfg == again.model.cfg


@pytest.mark.parametrize("kwargs,message", [
    ({}, "nothing to prune"),
    (dict(target_params="0.5x", d_model=8), "either"),
    (dict(d_model=8, axes="sideways"), "axes"),
    (dict(drop_layers="1,x"), "comma-separated"),
    (dict(d_model=8, tolerance=1.5), "tolerance"),
])
def test_prune_config_refuses_bad_combinations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**kwargs)


def test_prune_needs_data_or_scores(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="--data"):
        prune(teacher_dir, tmp_path / "s", PruneConfig(d_model=48))
    assert not (tmp_path / "s").exists()  # nothing written


def test_prune_an_in_memory_model_records_no_source(tmp_path, small_shards):
    torch.manual_seed(1)
    model = HybridLM(HybridConfig(**TINY_MODEL))
    r = prune(model, tmp_path / "s", PruneConfig(n_drop=1, calib_seqs=2, seq_len=16), data=small_shards)
    meta = json.loads((r.out / "config.json").read_text())
    assert "pruned_from" not in meta and len(meta["prune_spec"]["drop_layers"]) == 1
    assert r.model.cfg.n_layers == model.cfg.n_layers - 1 and not (r.out / "tokenizer.json").exists()
