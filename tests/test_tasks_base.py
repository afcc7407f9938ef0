"""tasks/base.py: the helpers every task shares (the zero loss of an empty batch, evaluation mode, the data
spec checks, the checkpoint helpers) and the task list in the paper's order."""
import pytest
import torch
import torch.nn as nn

from tasks import TASKS
from tasks.base import (check_compatible, eval_length, eval_mode, is_synthetic, load_checkpoint, split_names,
                        zero_loss)


def test_tasks_are_listed_in_paper_order_with_their_names():
    assert list(TASKS) == ["pretrain", "detect", "itm_mlm", "vqa", "video", "linear_probe", "classify"]
    assert all(cls.name == name for name, cls in TASKS.items())


def test_zero_loss_is_zero_and_reaches_every_trainable_weight_with_a_zero_gradient():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    loss = zero_loss(model)
    assert loss.item() == 0.0
    loss.backward()
    assert model[0].weight.grad is None  # a frozen weight takes no part
    for p in model[1].parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_eval_mode_restores_the_training_mode_even_after_an_error():
    model = nn.Dropout(0.5).train()
    with eval_mode(model):
        assert not model.training
    assert model.training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("evaluation failed")
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training


def test_data_spec_checks():
    assert is_synthetic("synthetic") and is_synthetic("synthetic:100") and is_synthetic("synthetic?p_short=1.0")
    assert not is_synthetic("csv:pairs.tsv") and not is_synthetic("folder:synthetic") and not is_synthetic("synthetic?x")
    assert eval_length("synthetic", 500) == {"length": 500} == eval_length("synthetic?p_short=1.0", 500)
    assert eval_length("synthetic:64", 500) == {}  # the spec names its own length
    assert eval_length("folder:val", 500) == {}
    assert split_names(" red cross, ,blue circle ") == ["red cross", "blue circle"]


def test_checkpoint_helpers_name_the_problem(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="no 'model' entry"):
        load_checkpoint(str(tmp_path / "other.pt"))
    own = {"a": torch.zeros(2), "b": torch.zeros(3)}
    check_compatible(own, {"a": torch.ones(2), "b": torch.ones(3)}, "x.pt")
    with pytest.raises(SystemExit, match=r"missing \['b'\].*unexpected \['c'\]"):
        check_compatible(own, {"a": torch.ones(2), "c": torch.ones(3)}, "x.pt")
    with pytest.raises(SystemExit, match="1 of another shape, e.g. a"):
        check_compatible(own, {"a": torch.ones(5), "b": torch.ones(3)}, "x.pt")
