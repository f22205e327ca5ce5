"""Every tokenizer, prior and conditioner latentgen ships runs the shared contract suites.

Test classes are made per shipped type at collection time (see ``examples.swept``), so a new
component is covered as soon as it registers (and tests/examples.py gives it a config).
"""

from __future__ import annotations

import torch

from examples import example, swept
from latentgen.testing import ConditionerContract, PriorContract, TokenizerContract

_RAW = {
    "class_label": ([0, 3, 4], [7]),
    "segmentation": (torch.arange(2 * 16 * 16).reshape(2, 16, 16) % 4, torch.full((16, 16), 4)),
    "depth": (torch.linspace(-1, 1, 2 * 16 * 16).reshape(2, 1, 16, 16), torch.full((16, 16), 2.0)),
    "pose": (
        torch.tensor([[[0.5, 0.5, 1], [0.1, 0.2, 1], [0.9, 0.9, 0]]] * 2),
        [[0.5, 0.5, 1], [0.1, 0.2, 1]],
    ),
    "edges": (torch.rand(2, 3, 16, 16) * 2 - 1, torch.full((16, 16), -0.5)),
    "low_resolution": (torch.rand(2, 3, 8, 8) * 2 - 1, torch.full((3, 8, 8), 3.0)),
}
_TOKENIZER_SIZES = {"toy.palette": 16, "vqvae": 16, "vqgan": 16}
_PRIOR_GRIDS = {"pixelsnail": (4, 4), "transformer": (3, 4), "toy.ngram": (4, 4)}


def _name(type_: str) -> str:
    return "".join(part.capitalize() for part in type_.replace(".", "_").split("_"))


for _type in swept("tokenizer"):
    globals()[f"TestTokenizer{_name(_type)}"] = type(
        f"TestTokenizer{_name(_type)}",
        (TokenizerContract,),
        {"config": example("tokenizer", _type), "image_size": _TOKENIZER_SIZES.get(_type, 32)},
    )

for _type in swept("prior"):
    globals()[f"TestPrior{_name(_type)}"] = type(
        f"TestPrior{_name(_type)}",
        (PriorContract,),
        {"config": example("prior", _type), "grid": _PRIOR_GRIDS.get(_type, (4, 4))},
    )

for _type in swept("conditioner"):
    raw, bad = _RAW[_type]
    globals()[f"TestConditioner{_name(_type)}"] = type(
        f"TestConditioner{_name(_type)}",
        (ConditionerContract,),
        {"config": example("conditioner", _type), "raw": raw, "bad_raw": bad},
    )


def test_every_component_has_a_contract_class():
    made = {n for n in globals() if n.startswith(("TestTokenizer", "TestPrior", "TestConditioner"))}
    want = len(swept("tokenizer")) + len(swept("prior")) + len(swept("conditioner"))
    assert len(made) == want >= 3
