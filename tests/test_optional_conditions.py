"""Per-condition dropout (``cond_dropout_each``): one prior samples from any set of conditions."""

from __future__ import annotations

import pytest
import torch

from examples import tiny_conditioned_pipe
from latentgen import Pipeline
from latentgen.conditioners.base import Conditioning
from latentgen.data.shapes import ShapesConfig, ShapesDataset
from latentgen.errors import InputError

CONDITIONERS = {
    "label": {"type": "class_label", "num_classes": 6},
    "segmentation": {"type": "segmentation", "num_classes": 7},
}
SLOTS = {"label": {"vocab_size": 6}, "segmentation": {"vocab_size": 7, "num_tokens": 16}}


def _pipe(**prior_kw) -> Pipeline:
    torch.manual_seed(0)
    return tiny_conditioned_pipe(CONDITIONERS, SLOTS, **prior_kw)


def _seg(i: int = 0) -> torch.Tensor:
    return ShapesDataset(ShapesConfig(size=4, image_size=16))[i]["segmentation"]


def test_each_condition_is_dropped_on_its_own_draw() -> None:
    pipe = _pipe(cond_dropout_each={"label": 0.5})
    prior = pipe.prior.train()
    conds = pipe.condition(label=[1] * 4000, segmentation=_seg().expand(4000, 16, 16))
    torch.manual_seed(0)
    out = prior.drop_conditions(conds, 4000)
    assert out is not None
    share = out["label"].drop.float().mean().item()
    assert 0.45 < share < 0.55, share
    assert out["segmentation"].drop is None or not out["segmentation"].drop.any()
    prior.eval()
    assert prior.drop_conditions(conds, 4000) is conds  # never outside training


def test_a_left_out_condition_is_the_null_condition() -> None:
    pipe = _pipe(cond_dropout_each={"segmentation": 0.3}, cond_dropout=0.1)
    codes = pipe.sample_codes(
        label=[2, 5], size=16, generator=torch.Generator().manual_seed(3)
    )  # [2, 4, 4]
    null_seg = Conditioning(torch.zeros(2, 16, dtype=torch.long), 7, grid=(4, 4)).null()
    conds = {"label": pipe.conditioners["label"].encode([2, 5]), "segmentation": null_seg}
    same = pipe.prior.eval().sample(
        conds, grid=(4, 4), sampler=pipe.sampler, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(codes, same)
    # and it differs from a draw with a real map in place of the null
    with_map = pipe.sample_codes(
        label=[2, 5],
        segmentation=_seg().expand(2, 16, 16),
        generator=torch.Generator().manual_seed(3),
    )
    assert with_map.shape == codes.shape
    # the map alone works too once both are optional
    both = _pipe(cond_dropout_each={"segmentation": 0.3, "label": 0.3})
    assert both(segmentation=_seg(), output_type="tensor").shape == (1, 3, 16, 16)


def test_leaving_out_a_required_condition_names_what_may_be_left_out() -> None:
    with pytest.raises(
        InputError,
        match=r"missing \['segmentation'\]\): it takes label=..., "
        r"segmentation=...\.$",
    ):
        _pipe()(label=[1], size=16)
    pipe = _pipe(cond_dropout_each={"segmentation": 0.2})
    with pytest.raises(InputError, match=r"missing \['label'\].*\(segmentation may be left out\)"):
        pipe(segmentation=_seg())
    with pytest.raises(InputError, match=r"missing \['label', 'segmentation'\]"):
        pipe.condition(size=16)  # at least one condition must be given


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="cond_dropout_each names 'depth'.*label, segmentation"):
        _pipe(cond_dropout_each={"depth": 0.5})
    with pytest.raises(ValueError, match=r"cond_dropout_each.label = 1.5 must lie in \[0, 1\]"):
        _pipe(cond_dropout_each={"label": 1.5})


def test_an_unlabelled_image_trains_with_the_null_label() -> None:
    """Label -1 marks an unlabelled image: its row is the prior's null label, in training too."""
    pipe = _pipe(cond_dropout_each={"label": 0.1})
    enc = pipe.conditioners["label"].encode
    mixed = enc([-1, 4, -1])
    assert mixed.drop is not None and mixed.drop.tolist() == [True, False, True]
    assert enc([1, 2]).drop is None  # fully labelled batches stay as they were
    seg = pipe.conditioners["segmentation"].encode(_seg().expand(3, 16, 16), size=(16, 16))
    codes = torch.randint(0, 16, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    prior = pipe.prior.eval()
    got = prior.code_log_probs(codes, {"label": mixed, "segmentation": seg})  # [3, 4, 4]
    null = prior.code_log_probs(codes, {"label": enc([0, 4, 0]).null(), "segmentation": seg})
    labelled = prior.code_log_probs(codes, {"label": enc([0, 4, 0]), "segmentation": seg})
    assert torch.allclose(got[[0, 2]], null[[0, 2]]) and torch.allclose(got[1], labelled[1])
    assert not torch.allclose(got[0], labelled[0])  # the null is not label 0
    # the training loss reads the same rows (dropout off: eval mode keeps conditions as given)
    assert torch.isfinite(prior.loss(codes, {"label": mixed, "segmentation": seg}))
    with pytest.raises(InputError, match=r"label -2 is outside \[0, 6\).*-1 marks an unlabelled"):
        enc([-2])
    # sampling with -1 asks for the null label: fine where the prior learned one ...
    pipe.prior.eval()
    assert pipe.sample_codes(label=[-1, 3], segmentation=_seg().expand(2, 16, 16)).shape == (
        2,
        4,
        4,
    )
    # ... refused where it never dropped the label (its null is untrained)
    plain = _pipe()
    with pytest.raises(InputError, match=r"unlabelled rows \(-1\).*cond_dropout > 0"):
        plain.sample_codes(label=[-1], segmentation=_seg()[None])
